"""agent.slurm: env, squeue and scontrol parsing; the subprocess path with fake commands on PATH."""

from __future__ import annotations

import stat
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.slurm import (
    SlurmJobInfo,
    detect_slurm_job,
    job_from_env,
    merge_scontrol,
    parse_scontrol_job,
    parse_slurm_duration,
    parse_slurm_time,
    parse_squeue_end_time,
    query_end_time,
    scontrol_end_time,
)

T_2026 = int(datetime(2026, 11, 22, 17, 52, 55, tzinfo=UTC).timestamp())

# `scontrol show job -o 4242` of a running job (trimmed), times in UTC.
SCONTROL_RUNNING = (
    "JobId=4242 JobName=modelpool-serve UserId=alice(1001) GroupId=alice(1001) MCS_label=N/A "
    "Priority=4294901758 Nice=0 Account=(null) QOS=normal JobState=RUNNING Reason=None Dependency=(null) "
    "RunTime=00:07:05 TimeLimit=04:00:00 TimeMin=N/A SubmitTime=2026-11-22T13:52:50 "
    "EligibleTime=2026-11-22T13:52:50 StartTime=2026-11-22T13:52:55 EndTime=2026-11-22T17:52:55 "
    "Deadline=N/A Partition=gpu AllocNode:Sid=login1:1234 ReqNodeList=(null) NodeList=gpu-[01-02] "
    "BatchHost=gpu-01 NumNodes=2 NumCPUs=16 TRES=cpu=16,mem=64G,node=2,gres/gpu=8 "
    "Command=/home/alice/serve.sbatch WorkDir=/home/alice StdOut=/home/alice/modelpool-serve-4242.out\n"
)


# ---------------------------------------------------------------------------------------------
# Times and durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T17:52:55", T_2026),
        (" 2026-11-22T17:52:55\n", T_2026),
        ("2026-11-22T17:52", T_2026 - 55),
        ("2026-11-22 17:52:55", T_2026),
        ("N/A", 0), ("n/a", 0), ("Unknown", 0), ("NONE", 0), ("UNLIMITED", 0), ("INFINITE", 0), ("", 0),
    ],
)
def test_parse_slurm_time_reads_utc_by_default(text: str, expected: int) -> None:
    assert parse_slurm_time(text) == expected


def test_parse_slurm_time_in_a_given_zone() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    assert parse_slurm_time("2026-11-22T23:22:55", ist) == T_2026


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01T00:00:00", "17:52:55", "1:00:00"])
def test_parse_slurm_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a Slurm time"):
        parse_slurm_time(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30 * 60),            # minutes
        ("1:00", 60),               # minutes:seconds (squeue %l of --time=1)
        ("59:59", 59 * 60 + 59),
        ("00:01:00", 60),           # scontrol TimeLimit
        ("04:00:00", 4 * 3600),
        ("2-12", (2 * 24 + 12) * 3600),  # days-hours
        ("1-02:30", (26 * 60 + 30) * 60),
        ("1-00:00:00", 86400),
        ("UNLIMITED", 0), ("INFINITE", 0), ("Partition_Limit", 0), ("NOT_SET", 0), ("N/A", 0),
    ],
)
def test_parse_slurm_duration(text: str, seconds: int) -> None:
    assert parse_slurm_duration(text) == seconds


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "1-", "a-01:00:00"])
def test_parse_slurm_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a Slurm time limit"):
        parse_slurm_duration(text)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("2026-11-22T17:52:55\n", T_2026),
        ("\n2026-11-22T17:52:55\n", T_2026),
        ("N/A\n", 0),            # pending
        ("NONE\n", 0),           # no time limit
        ("UNLIMITED\n", 0),
        ("", None),              # job unknown to squeue: no answer
        ("slurm_load_jobs error: Invalid job id\n", None),
    ],
)
def test_parse_squeue_end_time(output: str, expected: int | None) -> None:
    assert parse_squeue_end_time(output) == expected


# ---------------------------------------------------------------------------------------------
# scontrol and env


def test_parse_scontrol_job() -> None:
    fields = parse_scontrol_job(SCONTROL_RUNNING)
    assert fields["JobId"] == "4242" and fields["Partition"] == "gpu" and fields["NodeList"] == "gpu-[01-02]"
    assert fields["TRES"] == "cpu=16,mem=64G,node=2,gres/gpu=8"  # '=' inside a value is kept
    assert fields["AllocNode:Sid"] == "login1:1234"
    assert parse_scontrol_job("JobId=1 JobId=2 junk =x") == {"JobId": "1"}


def test_scontrol_end_time_prefers_end_time_then_start_plus_limit() -> None:
    assert scontrol_end_time(parse_scontrol_job(SCONTROL_RUNNING)) == T_2026
    fields = {"EndTime": "Unknown", "StartTime": "2026-11-22T13:52:55", "TimeLimit": "04:00:00"}
    assert scontrol_end_time(fields) == T_2026
    assert scontrol_end_time({"EndTime": "Unknown", "StartTime": "2026-11-22T13:52:55", "TimeLimit": "UNLIMITED"}) == 0
    assert scontrol_end_time({"EndTime": "garbage", "StartTime": "Unknown", "TimeLimit": "1:00"}) == 0
    assert scontrol_end_time({}) == 0


def test_job_from_env() -> None:
    assert job_from_env({}) is None
    assert job_from_env({"SLURM_JOB_ID": "  "}) is None
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_NODELIST": "gpu-[01-02]",
           "SLURM_JOB_USER": "alice", "USER": "bob"}
    assert job_from_env(env) == SlurmJobInfo("4242", "gpu", "gpu-[01-02]", 0, "alice")
    old_names = {"SLURM_JOBID": "7", "SLURM_NODELIST": "n1", "USER": "bob"}
    assert job_from_env(old_names) == SlurmJobInfo("7", "", "n1", 0, "bob")


def test_merge_scontrol_fills_only_what_is_missing() -> None:
    fields = parse_scontrol_job(SCONTROL_RUNNING)
    bare = SlurmJobInfo("4242", "", "", 0, "")
    assert merge_scontrol(bare, fields) == SlurmJobInfo("4242", "gpu", "gpu-[01-02]", T_2026, "alice")
    known = SlurmJobInfo("4242", "p", "n", 123, "u")
    assert merge_scontrol(known, fields) == known


def test_to_pb() -> None:
    pb = SlurmJobInfo("4242", "gpu", "gpu-01", T_2026, "alice").to_pb()
    assert (pb.job_id, pb.partition, pb.node_list, pb.end_time_unix, pb.user) == (
        "4242", "gpu", "gpu-01", T_2026, "alice")


# ---------------------------------------------------------------------------------------------
# The subprocess path: fake squeue / scontrol on PATH


def _bin(tmp_path: Path, scripts: dict[str, str]) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bindir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bindir


def _job_env(bindir: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_PARTITION": "gpu",
            "SLURM_JOB_NODELIST": "gpu-01", "SLURM_JOB_USER": "alice", **extra}


def test_squeue_is_asked_with_pinned_zone_and_format(tmp_path: Path) -> None:
    record = tmp_path / "squeue.args"
    bindir = _bin(tmp_path, {"squeue": f'echo "$@ TZ=$TZ FMT=$SLURM_TIME_FORMAT" > {record}\n'
                                       'echo 2026-11-22T17:52:55\n'})
    job = detect_slurm_job(_job_env(bindir, TZ="Asia/Kolkata", SLURM_TIME_FORMAT="relative"))
    assert job == SlurmJobInfo("4242", "gpu", "gpu-01", T_2026, "alice")
    assert record.read_text().split() == ["-h", "-j", "4242", "-o", "%e", "TZ=UTC", "FMT=standard"]


def test_falls_back_to_scontrol_when_squeue_fails(tmp_path: Path) -> None:
    record = tmp_path / "scontrol.args"
    bindir = _bin(tmp_path, {
        "squeue": "echo 'squeue: error: Invalid job id specified' >&2\nexit 1\n",
        "scontrol": f'echo "$@" > {record}\ncat <<EOF\n{SCONTROL_RUNNING}EOF\n',
    })
    job = detect_slurm_job({"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242"})
    assert job == SlurmJobInfo("4242", "gpu", "gpu-[01-02]", T_2026, "alice")
    assert record.read_text().split() == ["show", "job", "-o", "4242"]


def test_no_time_limit_is_zero_not_an_error(tmp_path: Path) -> None:
    unlimited = SCONTROL_RUNNING.replace("EndTime=2026-11-22T17:52:55", "EndTime=Unknown").replace(
        "TimeLimit=04:00:00", "TimeLimit=UNLIMITED")
    bindir = _bin(tmp_path, {"squeue": "echo NONE\n", "scontrol": f"cat <<EOF\n{unlimited}EOF\n"})
    job = detect_slurm_job(_job_env(bindir))
    assert job is not None and job.end_time_unix == 0


def test_missing_commands_leave_the_end_time_unknown(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    job = detect_slurm_job(_job_env(empty))
    assert job == SlurmJobInfo("4242", "gpu", "gpu-01", 0, "alice")
    assert query_end_time("4242", {"PATH": str(empty)}) is None


def test_outside_slurm_is_none_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bindir = _bin(tmp_path, {"squeue": f"touch {marker}\n", "scontrol": f"touch {marker}\n"})
    assert detect_slurm_job({"PATH": str(bindir)}) is None
    assert not marker.exists()


def test_hanging_commands_time_out(tmp_path: Path) -> None:
    bindir = _bin(tmp_path, {"squeue": "exec sleep 30\n", "scontrol": "exec sleep 30\n"})
    started = time.monotonic()
    job = detect_slurm_job(_job_env(bindir), timeout_s=0.3)
    assert job == SlurmJobInfo("4242", "gpu", "gpu-01", 0, "alice")
    assert time.monotonic() - started < 5
