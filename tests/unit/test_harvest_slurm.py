"""The harvester's Slurm adapter: parsers on captured 22.05 output and the 24.05 print format, retries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import structlog

from controlplane.harvest.errors import SlurmCommandError
from controlplane.harvest.slurm import (
    CommandResult,
    Slurm,
    parse_gres,
    parse_sbatch_parsable,
    parse_scontrol_nodes,
    parse_sinfo_partitions,
    parse_squeue,
    parse_tres_per_node,
    split_top_level,
)

DATA = Path(__file__).parent / "data"


def read(name: str) -> str:
    return (DATA / name).read_text()


# -- 22.05, captured from the real test cluster ------------------------------------------------------


def test_sinfo_22_05_partitions_default_and_limits() -> None:
    parts = {p.name: p for p in parse_sinfo_partitions(read("slurm-22.05/sinfo.txt"))}
    assert list(parts) == ["debug", "gpu", "closed"]
    assert parts["debug"].default and parts["debug"].up and parts["debug"].max_time_s == 0
    assert parts["gpu"].max_time_s == 2 * 86400 and not parts["gpu"].default
    assert not parts["closed"].up and parts["closed"].max_time_s == 3600


def test_scontrol_22_05_idle_node_offers_every_gpu() -> None:
    (node,) = parse_scontrol_nodes(read("slurm-22.05/scontrol_idle.txt"))
    assert node.name == "gpu-n1" and node.state == "IDLE"
    assert node.partitions == ("debug", "gpu", "closed")
    assert node.gpus_total == {"a100": 2, "rtx4090": 2}
    assert node.gpus_used == {"a100": 0, "rtx4090": 0}
    assert (node.cpus, node.cpus_alloc) == (8, 0)
    assert node.schedulable and node.idle_gpus() == {"a100": 2, "rtx4090": 2}


def test_scontrol_22_05_mixed_node_subtracts_used_gpus() -> None:
    (node,) = parse_scontrol_nodes(read("slurm-22.05/scontrol_mixed.txt"))
    assert node.state == "MIXED" and node.schedulable
    assert node.idle_gpus() == {"a100": 1, "rtx4090": 1}


def test_scontrol_22_05_drained_node_offers_nothing() -> None:
    (node,) = parse_scontrol_nodes(read("slurm-22.05/scontrol_drain.txt"))
    assert node.state == "MIXED+DRAIN" and not node.schedulable
    assert node.idle_gpus() == {"a100": 0, "rtx4090": 0}


def test_squeue_22_05_running_pending_cancelled() -> None:
    jobs = {j.job_id: j for j in parse_squeue(read("slurm-22.05/squeue.txt"))}
    run, pend, gone = jobs["1"], jobs["3"], jobs["2"]
    assert run.state == "RUNNING" and run.active and run.gpus == {"a100": 1} and run.partition == "gpu"
    assert run.end_unix - run.start_unix == 300 and run.time_limit_s == 300 and run.node == "gpu-n1"
    assert pend.state == "PENDING" and pend.start_unix == 0 and pend.reason == "Resources" and pend.gpus == {"a100": 2}
    assert gone.state == "CANCELLED" and not gone.active and gone.end_unix - gone.start_unix == 2
    assert gone.time_limit_s == 5400 and gone.gpus == {"rtx4090": 1}


# -- 24.05 print format ----------------------------------------------------------------------------


def test_scontrol_24_05_states_sockets_index_lists_shards_drained_gres() -> None:
    nodes = {n.name: n for n in parse_scontrol_nodes(read("slurm-24.05/scontrol.txt"))}
    assert nodes["gpu-a01"].idle_gpus() == {"a100": 2}                 # GresUsed=gpu:a100:2(IDX:0,2)
    assert nodes["gpu-a01"].partitions == ("gpu", "preempt")
    assert not nodes["gpu-a02"].schedulable                           # IDLE+PLANNED: kept for a pending job
    assert nodes["rtx-c01"].gpus_total == {"rtx4090": 8}               # shards are not GPUs
    assert nodes["rtx-c01"].idle_gpus() == {"rtx4090": 5}              # IDX:0-1,5 = 3 used
    assert nodes["rtx-c02"].idle_gpus() == {"rtx4090": 7}              # GresDrain=gpu:rtx4090:1
    assert not nodes["rtx-c03"].schedulable                           # IDLE+DRAIN
    assert nodes["cpu-x01"].gpus_total == {} and not nodes["cpu-x01"].schedulable   # ALLOCATED
    assert not nodes["gpu-h01"].schedulable                           # IDLE+NOT_RESPONDING


def test_sinfo_24_05_inactive_partition_is_not_up() -> None:
    parts = {p.name: p for p in parse_sinfo_partitions(read("slurm-24.05/sinfo.txt"))}
    assert parts["gpu"].default and parts["consumer"].max_time_s == 12 * 3600
    assert not parts["maint"].up and parts["cpu"].max_time_s == 7 * 86400


def test_squeue_24_05_tres_per_node_in_the_slash_form() -> None:
    jobs = {j.job_id: j for j in parse_squeue(read("slurm-24.05/squeue.txt"))}
    assert jobs["58211"].gpus == {"rtx4090": 1} and jobs["58211"].time_limit_s == 4 * 3600
    assert jobs["58214"].gpus == {"a100": 2} and jobs["58214"].reason == "Priority"
    assert jobs["58190"].state == "PREEMPTED" and not jobs["58190"].active
    assert jobs["58230"].gpus == {"": 2} and jobs["58230"].active and jobs["58230"].time_limit_s == 86400


# -- pieces ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("gpu:a100:2(S:0),gpu:rtx4090:2", {"a100": 2, "rtx4090": 2}),
    ("gpu:4", {"": 4}),
    ("gpu:a100:2(IDX:0,2),gpu:a100:1(IDX:3)", {"a100": 3}),
    ("(null)", {}), ("N/A", {}), ("", {}),
    ("mps:200,gpu:l40s:1", {"l40s": 1}),
    ("gpu:nvidia_a100-sxm4-80gb:8(S:0-1)", {"nvidia_a100-sxm4-80gb": 8}),
])
def test_parse_gres(text: str, expected: dict[str, int]) -> None:
    assert parse_gres(text) == expected


def test_parse_gres_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="unreadable GRES item"):
        parse_gres("gpu:a100:lots")


@pytest.mark.parametrize(("text", "expected"), [
    ("gres:gpu:a100:1", {"a100": 1}), ("gres/gpu:a100:1", {"a100": 1}), ("gres/gpu:2", {"": 2}),
    ("gres/gpu:a100:1,gres/shard:4", {"a100": 1}), ("N/A", {}), ("cpu=4", {}),
])
def test_parse_tres_per_node_both_forms(text: str, expected: dict[str, int]) -> None:
    assert parse_tres_per_node(text) == expected


def test_untyped_use_counts_against_every_type() -> None:
    line = "NodeName=n State=MIXED CPUTot=8 CPUAlloc=1 Gres=gpu:a100:2,gpu:l40s:4 GresUsed=gpu:2 Partitions=p"
    (node,) = parse_scontrol_nodes(line)
    assert node.idle_gpus() == {"a100": 0, "l40s": 2}


def test_no_free_cpu_means_not_schedulable() -> None:
    (node,) = parse_scontrol_nodes("NodeName=n State=MIXED CPUEfctv=8 CPUTot=8 CPUAlloc=8 Gres=gpu:a100:2 "
                                   "GresUsed=gpu:a100:0(IDX:N/A) Partitions=p")
    assert not node.schedulable


def test_split_top_level_and_sbatch_output() -> None:
    assert split_top_level("a(1,2),b,c(x,(y,z))") == ["a(1,2)", "b", "c(x,(y,z))"]
    assert parse_sbatch_parsable("4711\n") == "4711" and parse_sbatch_parsable("4711;mptest") == "4711"
    with pytest.raises(ValueError):
        parse_sbatch_parsable("sbatch: error: Batch job submission failed")


def test_unreadable_lines_are_errors_not_guesses() -> None:
    with pytest.raises(ValueError):
        parse_squeue("1|name|RUNNING")
    with pytest.raises(ValueError):
        parse_sinfo_partitions("gpu|up")
    with pytest.raises(ValueError):
        parse_scontrol_nodes("State=IDLE Gres=gpu:1")


# -- the shell: retries, logging, no sbatch retry ----------------------------------------------------------


class ScriptedRunner:
    """Answers commands from a list of results, recording what ran."""

    def __init__(self, results: list[CommandResult | Exception]) -> None:
        self.results = results
        self.calls: list[tuple[tuple[str, ...], dict[str, str]]] = []

    async def __call__(self, argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> CommandResult:
        self.calls.append((tuple(argv), dict(env)))
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


async def test_failed_command_is_logged_with_stderr_and_retried() -> None:
    runner = ScriptedRunner([CommandResult(1, "", "slurm_load_partitions: Unable to contact slurm controller"),
                             CommandResult(0, read("slurm-22.05/sinfo.txt"), "")])
    slurm = Slurm({"PATH": "/usr/bin", "TZ": "Asia/Kolkata"}, retries=2, retry_delay_s=0.0, runner=runner)
    with structlog.testing.capture_logs() as logs:
        parts = await slurm.partitions()
    assert [p.name for p in parts] == ["debug", "gpu", "closed"]
    assert len(runner.calls) == 2
    assert runner.calls[0][1]["TZ"] == "UTC" and runner.calls[0][1]["SLURM_TIME_FORMAT"] == "standard"
    (warning,) = [e for e in logs if e["event"] == "slurm command failed"]
    assert "Unable to contact slurm controller" in warning["stderr"] and warning["attempt"] == 1


async def test_command_failing_every_try_raises_with_its_stderr() -> None:
    runner = ScriptedRunner([CommandResult(1, "", "boom"), SlurmCommandError(["sinfo"], "timed out after 20s"),
                             CommandResult(2, "", "still down")])
    slurm = Slurm({}, retries=2, retry_delay_s=0.0, runner=runner)
    with pytest.raises(SlurmCommandError, match="still down") as info:
        await slurm.partitions()
    assert info.value.returncode == 2 and len(runner.calls) == 3


async def test_sbatch_is_not_retried_and_gets_the_job_environment() -> None:
    runner = ScriptedRunner([CommandResult(1, "", "Invalid partition name specified")])
    slurm = Slurm({"PATH": "/bin"}, retries=3, retry_delay_s=0.0, runner=runner)
    with pytest.raises(SlurmCommandError, match="Invalid partition"):
        await slurm.submit("pool.sbatch", ["--partition=nope"], {"ENGINE": "sim"})
    assert len(runner.calls) == 1
    argv, env = runner.calls[0]
    assert argv == ("sbatch", "--parsable", "--partition=nope", "pool.sbatch") and env["ENGINE"] == "sim"


async def test_unreadable_output_is_a_command_error() -> None:
    slurm = Slurm({}, runner=ScriptedRunner([CommandResult(0, "garbage without pipes\n", "")]))
    with pytest.raises(SlurmCommandError, match="unreadable output"):
        await slurm.partitions()


async def test_missing_program_is_a_command_error() -> None:
    slurm = Slurm({"PATH": "/nonexistent"}, retries=0)
    with pytest.raises(SlurmCommandError, match="sinfo not found on PATH"):
        await slurm.partitions()
