"""Against a real single-node Slurm: the pre-end USR1, agent.slurm inside a job, the ops/slurm templates.

All jobs are submitted at once by one module fixture (the test node advertises 8 CPUs), so the
module costs one signal wait (~10-60 s: Slurm checks signal deadlines on a ~30 s tick) rather
than one per test.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurmcluster import FINAL_STATES, SlurmCluster

from agent.slurm import parse_scontrol_job

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops" / "slurm"
SIGNAL_ARGS = ("--time=1", "--signal=B:USR1@50")  # USR1 due 10 s after start
WAIT_S = 100.0

# Traps USR1 like an agent would; asks agent.slurm (the repo's venv python) about its own job.
PROBE_JOB = """#!/bin/bash
out={out}
date +%s > "$out/started"
trap 'date +%s > "$out/usr1"; exit 0' USR1
{python} -c 'import json, sys; from agent.slurm import detect_slurm_job
json.dump(detect_slurm_job().__dict__, open(sys.argv[1], "w"))' "$out/job.json"
while :; do sleep 1; done
"""

# Stands in for `ctl`: records its argv and pid, waits for USR1 (or exits at once with EXIT_NOW=1).
# A stand-in for `ctl`, in Python like the real one: the templates ignore USR1 before `exec`
# (so an early signal cannot kill the agent during start-up) and only a program that installs
# its own handler gets it afterwards; bash cannot trap a signal ignored on entry.
FAKE_CTL = f"""#!{sys.executable}
import os, signal, sys, time
out = os.environ["FAKE_CTL_OUT"]
open(os.path.join(out, "argv"), "w").write("\\n".join(sys.argv[1:]) + "\\n")
open(os.path.join(out, "started"), "w").write(str(int(time.time())))
if os.environ.get("EXIT_NOW") == "1":
    sys.exit(0)
def on_usr1(*_):
    open(os.path.join(out, "usr1"), "w").write(str(int(time.time())))
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
while True:
    time.sleep(1)
"""


@dataclass(frozen=True)
class Job:
    """A submitted job and the directory it writes its evidence to."""

    job_id: str
    out: Path


def _wait_file(path: Path, job: Job, cluster: SlurmCluster, timeout_s: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        state = cluster.job_state(job.job_id)
        if state in FINAL_STATES and not path.exists():
            break
        time.sleep(0.25)
    raise AssertionError(f"{path.name} never written by job {job.job_id} "
                         f"(state {cluster.job_state(job.job_id)!r}): {_job_output(cluster, job)}")


def _job_output(cluster: SlurmCluster, job: Job) -> str:
    files = sorted((cluster.directory / "jobs").glob(f"*-{job.job_id}.out"))
    return files[0].read_text() if files else "(no output file)"


@pytest.fixture(scope="module")
def jobs(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """Submit every job of this module up front so they run side by side."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    root.chmod(0o755)
    ctl = root / "fake-ctl"
    ctl.write_text(FAKE_CTL)
    ctl.chmod(ctl.stat().st_mode | stat.S_IXUSR)

    def outdir(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    submitted: dict[str, Job] = {}
    out = outdir("probe")
    # An odd time zone in the job: the end time must not depend on it.
    submitted["probe"] = Job(slurm_cluster.sbatch(
        PROBE_JOB.format(out=out, python=sys.executable), env={"TZ": "Asia/Kolkata", "PYTHONPATH": str(REPO)},
        args=SIGNAL_ARGS), out)

    out = outdir("serve")
    submitted["serve"] = Job(slurm_cluster.sbatch((OPS / "serve.sbatch").read_text(), args=SIGNAL_ARGS, env={
        "CTL": str(ctl), "FAKE_CTL_OUT": str(out), "MODEL": "org/My Model", "ETCD": "10.0.0.1:2379",
        "ENGINE": "sim", "GPUS": "1xSIM-24GB", "SIM_OPTIONS": "ttft_ms=5 seed=3", "EXTRA_ARGS": "--lease-ttl 7 *",
        "DRAIN_GRACE": "", "CHAIN": "0"}), out)

    out = outdir("chain")
    submitted["chain"] = Job(slurm_cluster.sbatch((OPS / "pool.sbatch").read_text(), args=("--time=3",), env={
        "CTL": str(ctl), "FAKE_CTL_OUT": str(out), "EXIT_NOW": "1", "ETCD": "", "MODELPOOL_ETCD": "etcd-a:2379",
        "CHAIN": "1", "CHAIN_OVERLAP_MIN": "1", "ETCD_PREFIX": "/p1", "NODE_ID": "n1"}), out)

    out = outdir("noetcd")
    submitted["noetcd"] = Job(slurm_cluster.sbatch((OPS / "pool.sbatch").read_text(), args=("--time=1",), env={
        "CTL": str(ctl), "FAKE_CTL_OUT": str(out), "EXIT_NOW": "1", "ETCD": "", "MODELPOOL_ETCD": ""}), out)
    return submitted


def test_batch_shell_gets_usr1_before_the_end_and_agent_slurm_reads_the_end_time(
        slurm_cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["probe"]
    facts = json.loads(_wait_file(job.out / "job.json", job, slurm_cluster))
    started = int(_wait_file(job.out / "started", job, slurm_cluster))
    assert facts["job_id"] == job.job_id
    assert facts["partition"] == "debug"
    assert facts["node_list"] == slurm_cluster.host
    assert facts["user"] == "root"
    # --time=1: the end is one minute after the start (epoch from `date +%s`, zone-free).
    assert started + 55 <= facts["end_time_unix"] <= started + 65, (started, facts)

    usr1 = int(_wait_file(job.out / "usr1", job, slurm_cluster))
    print(f"USR1 due 10 s after start arrived after {usr1 - started} s (end at +{facts['end_time_unix'] - started} s)")
    assert started <= usr1 < facts["end_time_unix"]
    assert slurm_cluster.wait_state(job.job_id, FINAL_STATES, 30) == "COMPLETED"  # exited from the trap


def test_scontrol_fields_of_a_real_job(slurm_cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["probe"]
    fields = parse_scontrol_job(slurm_cluster.scontrol("show", "job", "-o", job.job_id))
    assert fields["JobId"] == job.job_id and fields["TimeLimit"] == "00:01:00"
    assert fields["UserId"].startswith("root(")


def test_serve_template_execs_the_agent_so_it_receives_usr1(slurm_cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["serve"]
    argv = _wait_file(job.out / "argv", job, slurm_cluster).splitlines()
    assert argv == ["agent", "--etcd", "10.0.0.1:2379", "--serve", "org/My Model", "--engine", "sim",
                    "--drain-grace", "60", "--gpus", "1xSIM-24GB", "--sim-option", "ttft_ms=5",
                    "--sim-option", "seed=3", "--lease-ttl", "7", "*"]
    # B:USR1 goes to the batch shell only: the fake agent sees it because the shell exec'd it.
    started = int(_wait_file(job.out / "started", job, slurm_cluster))
    usr1 = int(_wait_file(job.out / "usr1", job, slurm_cluster))
    assert started <= usr1 <= started + 60
    assert slurm_cluster.wait_state(job.job_id, FINAL_STATES, 30) == "COMPLETED"


def test_pool_template_chains_a_successor_before_its_end(slurm_cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["chain"]
    argv = _wait_file(job.out / "argv", job, slurm_cluster).splitlines()
    assert argv == ["agent", "--pool", "--etcd", "etcd-a:2379", "--drain-grace", "60", "--etcd-prefix", "/p1",
                    "--node-id", "n1"]
    slurm_cluster.wait_state(job.job_id, FINAL_STATES, 30)
    output = _job_output(slurm_cluster, job)
    line = next((ln for ln in output.splitlines() if ln.startswith("chain: submitted successor ")), None)
    assert line is not None, output
    successor = line.split()[3]
    fields = parse_scontrol_job(slurm_cluster.scontrol("show", "job", "-o", successor))
    # --time=3 with a 1-minute overlap: eligible 2 minutes after this job started.
    assert fields["Dependency"].startswith(f"after:{job.job_id}+2"), fields["Dependency"]
    assert fields["TimeLimit"] == "00:03:00"
    assert fields["JobName"] == "modelpool-pool" and fields["Partition"] == "debug"
    assert fields["JobState"] == "PENDING"
    slurm_cluster.scancel(successor)


def test_template_without_etcd_fails_with_a_message(slurm_cluster: SlurmCluster, jobs: dict[str, Job]) -> None:
    job = jobs["noetcd"]
    assert slurm_cluster.wait_state(job.job_id, FINAL_STATES, WAIT_S) == "FAILED"
    assert "set ETCD (or MODELPOOL_ETCD)" in _job_output(slurm_cluster, job)
    assert not (job.out / "argv").exists()


def test_templates_share_the_chain_block() -> None:
    def block(name: str) -> str:
        text = (OPS / name).read_text()
        return text[text.index("# --- chained successor"):text.index("# --- the agent")]

    assert block("serve.sbatch") == block("pool.sbatch")
