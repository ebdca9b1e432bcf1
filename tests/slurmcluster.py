"""A real single-node Slurm cluster for tests (a helper, not a test): munged, slurmctld, slurmd.

Everything lives in one temp dir and is private to the run: a fresh munge key and socket, a
``slurm.conf`` on free ports, state and spool dirs, logs. The daemons run in the foreground as
children of this process, so stopping them is killing those pids. Clients find the cluster
through ``SLURM_CONF`` in ``cluster.env``; ``sbatch`` exports the submitter's environment to
the job, so ``squeue``/``scontrol`` run inside a job reach the same cluster. The system's
``/etc/slurm`` and ``/etc/munge`` are never read or written.

The node advertises typed GPUs through GRES (``gpus``, default 2x a100 + 2x rtx4090): a
``gres.conf`` beside ``slurm.conf`` whose ``File=`` entries are empty placeholder files, because
slurmd drops GPUs without device files and the node goes INVAL. ``sbatch --gres=gpu:a100:1``
then schedules against them; nothing isolates them (task/none), which tests do not need.

Needs root (SlurmUser=root, munged refuses a key it does not own) and the Debian packages
``slurm-wlm`` and ``munge``. ``SlurmCluster.start()`` raises ``SlurmUnavailable`` with the
reason when something is missing or a daemon does not come up; the pytest fixture turns that
into a skip.

    with SlurmCluster.in_temp_dir() as cluster:
        job = cluster.sbatch("#!/bin/sh\\nsleep 1\\n")
        cluster.wait_state(job, {"COMPLETED"})
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 15.0
CPUS_ADVERTISED = 8
SBIN_DIRS = "/usr/sbin:/sbin:/usr/local/sbin"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})

SLURM_CONF = """\
ClusterName=mptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{gres_types}ReturnToService=2
# Advertise CPUS_ADVERTISED CPUs whatever the host has, so a few 1-CPU test jobs run side by side.
SlurmdParameters=config_overrides
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} RealMemory={memory_mb}{gres} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
{extra}"""

#: Typed GPUs the test node advertises through GRES (Slurm type -> count). slurmd drops GPUs
#: without device files ("Removing file-less GPU", node INVAL), so gres.conf points ``File=`` at
#: empty placeholder files under the cluster dir; task/none means nothing is isolated, which
#: tests do not need. Jobs that ask for no GRES are unaffected.
DEFAULT_GPUS: dict[str, int] = {"a100": 2, "rtx4090": 2}


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run here (not root, packages missing, a daemon failed); says why."""


class SlurmCommandError(RuntimeError):
    """A Slurm client command failed; carries its stderr."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_program(name: str) -> str | None:
    """``name`` on PATH, else in the sbin dirs a non-login PATH often lacks (where the daemons live)."""
    return shutil.which(name) or shutil.which(name, path=SBIN_DIRS)


def missing_requirements() -> str | None:
    """Why this host cannot run the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (SlurmUser=root, munged key ownership)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if find_program(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)"
    return None


@dataclass
class SlurmCluster:
    """One private single-node Slurm cluster rooted at ``directory``."""

    directory: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    owns_directory: bool = False
    gpus: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_GPUS))
    extra_conf: str = ""                                # more slurm.conf lines (partitions, preemption)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)  # job ids sbatch() returned, in order

    @classmethod
    def in_temp_dir(cls, *, gpus: Mapping[str, int] | None = None, extra_conf: str = "") -> SlurmCluster:
        """A cluster whose files live in a fresh temp dir, removed by ``stop()``.

        ``gpus``: typed GPUs of the node (default ``DEFAULT_GPUS``; ``{}`` for none);
        ``extra_conf``: lines appended to slurm.conf (``{host}`` is replaced by the node name).
        """
        return cls(directory=Path(tempfile.mkdtemp(prefix="mp-slurm-")), owns_directory=True,
                   gpus=dict(DEFAULT_GPUS if gpus is None else gpus), extra_conf=extra_conf)

    # -- paths and environment --------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        """The cluster's slurm.conf."""
        return self.directory / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        """The private munged's socket."""
        return self.directory / "munge" / "munge.socket.2"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> SlurmCluster:
        """Write the configuration, start the three daemons, wait until the node is idle."""
        try:
            reason = missing_requirements()
            if reason is not None:
                raise SlurmUnavailable(reason)
            self._write_files()
            self._start_munged(timeout_s)
            conf = ["-f", str(self.conf_path)]
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", *conf])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.host, *conf])
            self._wait_node_idle(timeout_s)
        except SlurmUnavailable:
            self.stop()
            raise
        log.info("slurm_cluster_started", directory=str(self.directory), host=self.host)
        return self

    def stop(self) -> None:
        """Cancel every job of this (private) cluster, kill the daemons it started, remove its temp dir."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self._command(["squeue", "-h", "-o", "%i"], check=False).split()
            if jobs:
                self._command(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self._command(["squeue", "-h", "-t", "R,CG", "-o", "%i"],
                                                                     check=False).strip():
                    time.sleep(0.3)
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_files(self) -> None:
        for sub in ("state", "spool", "munge", "jobs"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        (self.directory / "munge").chmod(0o700)
        key = self.directory / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        gres = ",".join(f"gpu:{t}:{n}" for t, n in self.gpus.items() if n > 0)
        self.conf_path.write_text(SLURM_CONF.format(
            host=self.host, dir=self.directory, munge_socket=self.munge_socket,
            ctld_port=_free_port(), slurmd_port=_free_port(),
            cpus=CPUS_ADVERTISED, memory_mb=1000,
            gres_types="GresTypes=gpu\n" if gres else "", gres=f" Gres={gres}" if gres else "",
            extra=self.extra_conf.replace("{host}", self.host)))
        (self.directory / "gres.conf").write_text(self._gres_conf())

    def _gres_conf(self) -> str:
        """One line per GPU type, its ``File=`` range over empty placeholder device files."""
        lines, first = [], 0
        devices = self.directory / "dev"
        devices.mkdir(exist_ok=True)
        for gpu_type, count in self.gpus.items():
            if count <= 0:
                continue
            for i in range(first, first + count):
                (devices / f"nvidia{i}").touch()
            last = first + count - 1
            files = f"{devices}/nvidia{first}" if count == 1 else f"{devices}/nvidia[{first}-{last}]"
            lines.append(f"NodeName={self.host} Name=gpu Type={gpu_type} File={files}\n")
            first += count
        return "".join(lines)

    def _start_munged(self, timeout_s: float) -> None:
        mdir = self.directory / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={mdir / 'munge.key'}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--seed-file={mdir / 'munged.seed'}", f"--log-file={mdir / 'munged.log'}"])
        deadline = time.monotonic() + timeout_s
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not create {self.munge_socket} in {timeout_s:.0f}s")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        program = find_program(argv[0]) or argv[0]
        logf = (self.directory / f"{name}.out").open("wb")
        self.procs[name] = subprocess.Popen([program, *argv[1:]], stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        logf.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 1500) -> str:
        """The end of a daemon's output and log file, for error messages."""
        text = ""
        for path in (self.directory / f"{name}.out", self.directory / f"{name}.log",
                     self.directory / "munge" / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-chars:].strip() or "(no output)"

    def _wait_node_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            out = self._command(["sinfo", "-h", "-n", self.host, "-o", "%t"], check=False)
            state = out.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"node {self.host} not idle after {timeout_s:.0f}s (sinfo: {state!r}); "
                               f"slurmctld: {self.log_tail('slurmctld', 600)} slurmd: {self.log_tail('slurmd', 600)}")

    # -- client commands ------------------------------------------------------------------

    def _command(self, argv: list[str], *, check: bool = True, env: Mapping[str, str] | None = None) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                 env={**self.env, **(env or {})}, check=False)
        except subprocess.TimeoutExpired as exc:
            if check:
                raise SlurmCommandError(f"{argv[0]} timed out after {COMMAND_TIMEOUT_S}s") from exc
            return ""
        if out.returncode != 0 and check:
            raise SlurmCommandError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, script_text: str, env: Mapping[str, str] | None = None, args: tuple[str, ...] = ()) -> str:
        """Submit ``script_text`` as a batch job (cwd: the cluster's jobs dir); returns the job id.

        ``env`` is added to the submitter's environment, which the job inherits.
        """
        script = self.directory / "jobs" / f"job-{len(self.submitted)}-{time.monotonic_ns()}.sh"
        script.write_text(script_text)
        out = self._command(["sbatch", "--parsable", f"--chdir={self.directory / 'jobs'}", *args, str(script)],
                            env=env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmCommandError(f"sbatch printed {out!r}, not a job id")
        self.submitted.append(job_id)
        return job_id

    def job_state(self, job_id: str) -> str:
        """The job's state ("PENDING", "RUNNING", "COMPLETED" …), or "" when Slurm no longer knows it."""
        out = self._command(["scontrol", "show", "job", "-o", job_id], check=False)
        for token in out.split():
            if token.startswith("JobState="):
                return token.partition("=")[2]
        return ""

    def wait_state(self, job_id: str, states: set[str] | frozenset[str], timeout_s: float = 60.0) -> str:
        """Poll until the job is in one of ``states``; SlurmCommandError on timeout."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.25)
        raise SlurmCommandError(f"job {job_id} still {state!r} after {timeout_s:.0f}s, wanted {sorted(states)}")

    def scancel(self, job_id: str, signal_name: str | None = None, batch_only: bool = False) -> None:
        """Cancel the job, or send it ``signal_name`` (``batch_only``: to the batch shell alone)."""
        argv = ["scancel"]
        if signal_name:
            argv.append(f"--signal={signal_name}")
        if batch_only:
            argv.append("--batch")
        self._command([*argv, job_id])

    def scontrol(self, *args: str) -> str:
        """Run ``scontrol ARGS`` against this cluster; returns stdout."""
        return self._command(["scontrol", *args])
