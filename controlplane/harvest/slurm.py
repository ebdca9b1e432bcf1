"""The one adapter over Slurm's commands: ``sinfo``, ``scontrol show node``, ``sbatch``, ``squeue``,
``scancel``. Pure parsers first (tested on captured output of Slurm 22.05 and the 24.05 print
format, tests/unit/test_harvest_slurm.py), then a small async shell that runs the commands.

What is read, and the version differences that matter:

* ``sinfo -h -a -o '%P|%a|%l'``: partitions, whether up, MaxTime (``infinite``, ``1:00:00``,
  ``2-00:00:00``). The default partition carries a ``*``.
* ``scontrol -d -o show node``: one line per node. ``-d`` is what adds ``GresUsed`` (without it
  only the configured ``Gres`` is printed). ``Gres=gpu:a100:2,gpu:rtx4090:2`` on 22.05;
  newer releases add socket affinity ``gpu:a100:4(S:0-1)``, and ``GresUsed`` carries index lists
  ``gpu:a100:2(IDX:0,2)`` whose commas are inside the parentheses (so items are split on
  top-level commas only). 22.05 prints ``GresDrain=N/A`` always; 23.11+ only when set. ``State``
  is a base state plus ``+FLAGS`` (``MIXED+DRAIN``, ``IDLE+PLANNED``, ``IDLE+CLOUD+POWERED_DOWN``)
  and a trailing ``*`` when the node does not respond.
* ``squeue -h -t all -n NAME -o FORMAT``: our jobs, including those ended within MinJobAge
  (so the real end time of a cancelled job is seen). ``%b`` (TRES per node) is
  ``gres:gpu:a100:1`` on 22.05 and ``gres/gpu:a100:1`` from 23.02 on; both parse.
  ``squeue -j`` is not used: it fails outright ("Invalid job id specified") when every id it is
  given has left the controller's memory.

Times: every command runs with ``TZ=UTC`` and ``SLURM_TIME_FORMAT=standard`` (agent/slurm.py),
so timestamps are ISO and read as UTC whatever the host's zone.

Failures: a command that exits non-zero or times out is logged with its stderr and retried
(``retries``, with a growing delay); after the last try it raises ``SlurmCommandError``. ``sbatch``
is never retried inside a call: a submission that timed out may have gone through, and a second
one would double it (the harvester adopts such a job by its name in the next round instead).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from agent.slurm import SLURM_CMD_ENV, parse_scontrol_job, parse_slurm_duration, parse_slurm_time
from controlplane.harvest.errors import SlurmCommandError

log = structlog.get_logger(__name__)
T = TypeVar("T")

SINFO_PARTITIONS = ("sinfo", "-h", "-a", "-o", "%P|%a|%l")
SCONTROL_NODES = ("scontrol", "-d", "-o", "show", "node")
#: job id | name | state | partition | TRES per node | start | end | time limit | nodes | reason
SQUEUE_FORMAT = "%i|%j|%T|%P|%b|%S|%e|%l|%N|%r"

#: Node state flags under which nothing new may start there (Slurm's node_state_string names).
#: PLANNED: the backfill scheduler has reserved the node for a pending job; taking it would delay that job.
_BLOCKING_FLAGS = frozenset({
    "DRAIN", "FAIL", "MAINTENANCE", "MAINT", "REBOOT_REQUESTED", "REBOOT_ISSUED", "POWERED_DOWN", "POWERING_DOWN",
    "POWER_DOWN", "POWERING_UP", "POWER_DRAIN", "NOT_RESPONDING", "RESERVED", "PLANNED", "INVALID_REG",
    "DYNAMIC_FUTURE", "BLOCKED",
})
_SCHEDULABLE_BASE = frozenset({"IDLE", "MIXED"})
_GRES_ITEM = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(?::(?P<type>[A-Za-z0-9_.\-]+))?:(?P<count>\d+)"
                        r"(?P<unit>[KMGTP])?(?:\(.*\))?$")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_NO_VALUE = frozenset({"", "(null)", "N/A", "NONE", "(NULL)"})


# -- pure parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """One partition as ``sinfo`` shows it."""

    name: str
    up: bool
    max_time_s: int          # 0 = unlimited
    default: bool = False


@dataclass(frozen=True)
class SlurmNode:
    """One node as ``scontrol -d show node`` shows it; GPU counts per Slurm GRES type ("" = untyped)."""

    name: str
    state: str
    partitions: tuple[str, ...]
    gpus_total: Mapping[str, int] = field(default_factory=dict)
    gpus_used: Mapping[str, int] = field(default_factory=dict)
    gpus_drained: Mapping[str, int] = field(default_factory=dict)
    cpus: int = 0
    cpus_alloc: int = 0
    memory_mb: int = 0
    memory_alloc_mb: int = 0

    @property
    def state_words(self) -> tuple[str, set[str]]:
        """The base state and the set of flags (``MIXED+DRAIN*`` -> ("MIXED", {"DRAIN", "NOT_RESPONDING"}))."""
        text = self.state.strip().upper()
        flags: set[str] = set()
        if text.endswith("*"):
            flags.add("NOT_RESPONDING")
            text = text.rstrip("*")
        base, *rest = text.split("+")
        flags.update(w for w in rest if w)
        return base, flags

    @property
    def schedulable(self) -> bool:
        """Whether Slurm would start a new job here now: IDLE or MIXED, no blocking flag, a CPU free."""
        base, flags = self.state_words
        if base not in _SCHEDULABLE_BASE or flags & _BLOCKING_FLAGS:
            return False
        return self.cpus == 0 or self.cpus_alloc < self.cpus

    def idle_gpus(self) -> dict[str, int]:
        """GPUs per Slurm type that a job could get now (0 for every type when not schedulable).

        When ``GresUsed`` only says how many GPUs are in use without their type (old releases,
        or an untyped request on a node with several types) we cannot tell which type they are:
        each type is assumed to have that many in use (an under-estimate of what is idle, never
        an over-estimate).
        """
        if not self.schedulable:
            return dict.fromkeys(self.gpus_total, 0)
        untyped_used = self.gpus_used.get("", 0) if "" not in self.gpus_total else 0
        out: dict[str, int] = {}
        for gtype, total in self.gpus_total.items():
            used = self.gpus_used.get(gtype, 0) + untyped_used + self.gpus_drained.get(gtype, 0)
            out[gtype] = max(0, total - used)
        return out


@dataclass(frozen=True)
class SlurmJobInfo:
    """One job as ``squeue -o SQUEUE_FORMAT`` shows it."""

    job_id: str
    name: str
    state: str                    # PENDING, RUNNING, COMPLETING, CANCELLED, COMPLETED, TIMEOUT, PREEMPTED, …
    partition: str
    gpus: Mapping[str, int]       # per node, per Slurm type ("" = untyped), from TRES per node
    start_unix: int               # 0 = not started / unknown (pending jobs show an expected start: ignored)
    end_unix: int                 # 0 = unknown
    time_limit_s: int             # 0 = unlimited
    node: str
    reason: str

    @property
    def active(self) -> bool:
        """Still holds or waits for resources (not in a final state)."""
        return self.state in ACTIVE_STATES


ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                           "RESV_DEL_HOLD"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "CONFIGURING", "RESIZING"})


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split on ``sep`` outside parentheses (``gpu:a100:2(IDX:0,2),gpu:x:1`` -> two items)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_gres(text: str, name: str = "gpu") -> dict[str, int]:
    """Counts per type of GRES ``name`` in a Gres / GresUsed / GresDrain value ("" = untyped).

    ``gpu:a100:2(S:0),gpu:rtx4090:2`` -> {"a100": 2, "rtx4090": 2}; ``gpu:4`` -> {"": 4};
    ``(null)``, ``N/A`` -> {}. Other GRES (``shard``, ``mps``, ``nic``) are ignored. Raises
    ValueError on an item it cannot read.
    """
    if text.strip().upper() in _NO_VALUE:
        return {}
    out: dict[str, int] = {}
    for item in split_top_level(text):
        m = _GRES_ITEM.match(item)
        if m is None:
            raise ValueError(f"unreadable GRES item {item!r} in {text!r}")
        if m["name"] != name:
            continue
        count = int(m["count"]) * (_UNITS[m["unit"]] if m["unit"] else 1)
        gtype = m["type"] or ""
        out[gtype] = out.get(gtype, 0) + count
    return out


def parse_tres_per_node(text: str, name: str = "gpu") -> dict[str, int]:
    """GPUs per type from squeue's ``%b``: ``gres:gpu:a100:1`` (22.05) or ``gres/gpu:a100:1`` (23.02+)."""
    if text.strip().upper() in _NO_VALUE:
        return {}
    items = []
    for item in split_top_level(text):
        for prefix in ("gres:", "gres/"):
            if item.startswith(prefix):
                items.append(item[len(prefix):])
                break
    return parse_gres(",".join(items), name) if items else {}


def parse_sinfo_partitions(text: str) -> list[Partition]:
    """Partitions from ``sinfo -h -a -o '%P|%a|%l'`` (one per name, in order)."""
    seen: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) != 3:
            raise ValueError(f"unreadable sinfo line {line!r}")
        raw, avail, limit = parts
        default = raw.endswith("*")
        name = raw.rstrip("*")
        try:
            max_time = parse_slurm_duration(limit)
        except ValueError:
            raise ValueError(f"unreadable partition time limit {limit!r} in {line!r}") from None
        if name not in seen:
            seen[name] = Partition(name=name, up=avail.strip().lower() == "up", max_time_s=max_time, default=default)
    return list(seen.values())


def parse_scontrol_nodes(text: str) -> list[SlurmNode]:
    """Nodes from ``scontrol -d -o show node`` (one line each). Raises ValueError on a line that has no
    NodeName or an unreadable Gres value."""
    nodes: list[SlurmNode] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = parse_scontrol_job(line)
        name = f.get("NodeName", "")
        if not name:
            raise ValueError(f"no NodeName in scontrol line {line[:200]!r}")
        parts = f.get("Partitions", "")
        nodes.append(SlurmNode(
            name=name, state=f.get("State", "UNKNOWN"),
            partitions=tuple(p for p in parts.split(",") if p and p.upper() not in _NO_VALUE),
            gpus_total=parse_gres(f.get("Gres", "")), gpus_used=parse_gres(f.get("GresUsed", "")),
            gpus_drained=parse_gres(f.get("GresDrain", "")),
            cpus=_int(f.get("CPUEfctv") or f.get("CPUTot", "0")), cpus_alloc=_int(f.get("CPUAlloc", "0")),
            memory_mb=_int(f.get("RealMemory", "0")), memory_alloc_mb=_int(f.get("AllocMem", "0")),
        ))
    return nodes


def parse_squeue(text: str) -> list[SlurmJobInfo]:
    """Jobs from ``squeue -h -o SQUEUE_FORMAT``; a line it cannot read raises ValueError."""
    jobs: list[SlurmJobInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("|")
        if len(parts) != 10:
            raise ValueError(f"unreadable squeue line {line!r}")
        job_id, name, state, partition, tres, start, end, limit, node, reason = (p.strip() for p in parts)
        if not job_id:
            raise ValueError(f"no job id in squeue line {line!r}")
        state = state.upper()
        try:
            start_s = parse_slurm_time(start) if state not in ("PENDING",) else 0
            end_s = parse_slurm_time(end) if state not in ("PENDING",) else 0
            limit_s = parse_slurm_duration(limit)
        except ValueError as exc:
            raise ValueError(f"squeue line {line!r}: {exc}") from None
        jobs.append(SlurmJobInfo(job_id=job_id, name=name, state=state, partition=partition,
                                 gpus=parse_tres_per_node(tres), start_unix=start_s, end_unix=end_s,
                                 time_limit_s=limit_s, node=node, reason=reason))
    return jobs


def parse_sbatch_parsable(text: str) -> str:
    """The job id from ``sbatch --parsable`` (``123`` or ``123;cluster``); ValueError otherwise."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed {text.strip()[:200]!r}, not a job id")
    return job_id


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


# -- the shell -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """What a command did."""

    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], Mapping[str, str], float], Awaitable[CommandResult]]


async def run_command(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> CommandResult:
    """Run ``argv`` (found on ``env['PATH']``) with a timeout; the process is killed when it overruns."""
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:
        raise SlurmCommandError(argv, f"{argv[0]} not found on PATH")
    proc = await asyncio.create_subprocess_exec(program, *argv[1:], stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=dict(env))
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SlurmCommandError(argv, f"timed out after {timeout_s:g}s") from None
    return CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


class Slurm:
    """Slurm's client commands, with timeouts, retries and parsed results.

    ``env`` is the environment the commands run in (``SLURM_CONF`` etc.; default: this
    process's), with times pinned to UTC. ``runner`` replaces the subprocess call in tests.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, timeout_s: float = 20.0, retries: int = 2,
                 retry_delay_s: float = 0.5, runner: Runner | None = None) -> None:
        self.env = {**(os.environ if env is None else env), **SLURM_CMD_ENV}
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.runner = runner or run_command

    async def run(self, argv: Sequence[str], *, retry: bool = True, env: Mapping[str, str] | None = None) -> str:
        """stdout of ``argv``; each failure is logged with its stderr, retried, and finally raised."""
        tries = 1 + (self.retries if retry else 0)
        run_env = {**self.env, **(env or {}), **SLURM_CMD_ENV}
        last = SlurmCommandError(argv, "not run")
        for attempt in range(1, tries + 1):
            try:
                result = await self.runner(argv, run_env, self.timeout_s)
            except SlurmCommandError as exc:
                last = exc
            except OSError as exc:
                last = SlurmCommandError(argv, f"could not run: {exc}")
            else:
                if result.returncode == 0:
                    return result.stdout
                last = SlurmCommandError(argv, f"exited with {result.returncode}", returncode=result.returncode,
                                         stderr=result.stderr)
            log.warning("slurm command failed", command=" ".join(argv), attempt=attempt, of=tries,
                        rc=last.returncode, stderr=last.stderr.strip()[-500:], error=str(last))
            if attempt < tries:
                await asyncio.sleep(self.retry_delay_s * attempt)
        raise last

    async def _parsed(self, argv: Sequence[str], parse: Callable[[str], T]) -> T:
        out = await self.run(argv)
        try:
            return parse(out)
        except ValueError as exc:
            raise SlurmCommandError(argv, f"unreadable output: {exc}") from None

    async def partitions(self) -> list[Partition]:
        """Every partition (``sinfo``)."""
        return await self._parsed(SINFO_PARTITIONS, parse_sinfo_partitions)

    async def nodes(self) -> list[SlurmNode]:
        """Every node with its GPUs and their use (``scontrol -d show node``)."""
        return await self._parsed(SCONTROL_NODES, parse_scontrol_nodes)

    async def jobs(self, name: str) -> list[SlurmJobInfo]:
        """Jobs named ``name`` in any state Slurm still remembers (``squeue -t all``)."""
        argv = ("squeue", "-h", "-t", "all", "-n", name, "-o", SQUEUE_FORMAT)
        return await self._parsed(argv, parse_squeue)

    async def submit(self, script: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        """``sbatch --parsable ARGS SCRIPT`` with ``env`` added to the job's environment; the job id.

        Not retried (see the module docstring)."""
        argv = ("sbatch", "--parsable", *args, script)
        out = await self.run(argv, retry=False, env=env)
        try:
            return parse_sbatch_parsable(out)
        except ValueError as exc:
            raise SlurmCommandError(argv, str(exc)) from None

    async def cancel(self, job_id: str, *, signal: str | None = None, batch: bool = False) -> None:
        """``scancel JOB`` (or send ``signal``; ``batch``: to the batch shell only)."""
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if batch:
            argv.append("--batch")
        await self.run([*argv, job_id])
