"""The harvester's inputs and outputs: settings, the views `decide` reads, the plan it returns,
and the budget arithmetic. Pure: no clock, no I/O.

Budget (``budget_gpu_hours_per_day``): GPU-hours of harvested jobs' *actual running time* in
the last 24 hours (a rolling window: no reset at midnight, no zone). A new job is admitted only
when ``used + reserved + gpus * time limit <= budget``, where ``reserved`` is what the active
jobs may still run until their time limits. For any later moment t, the usage in
[t - 24 h, t] is at most the usage in [now - 24 h, now] plus everything that can run after now,
which is ``used + reserved``: so admission alone keeps the budget however long the harvester
is away (Slurm's time limit ends every job). Earlier runs of a requeued job are counted in full
while its record lives (a little pessimistic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controlplane.harvest.slurm import SlurmJobInfo, SlurmNode
from controlplane.pb import HarvestJob, HarvestJobState
from controlplane.planner.snapshot import Snapshot

WINDOW_S = 86400.0
ACTIVE = frozenset({HarvestJobState.HARVEST_PENDING, HarvestJobState.HARVEST_RUNNING,
                    HarvestJobState.HARVEST_RELEASING, HarvestJobState.HARVEST_CANCELLED})
STATE_NAMES = {HarvestJobState.HARVEST_PENDING: "pending", HarvestJobState.HARVEST_RUNNING: "running",
               HarvestJobState.HARVEST_RELEASING: "releasing", HarvestJobState.HARVEST_CANCELLED: "cancelled",
               HarvestJobState.HARVEST_ENDED: "ended", HarvestJobState.HARVEST_JOB_STATE_UNSPECIFIED: "unknown"}


@dataclass(frozen=True)
class HarvestSettings:
    """What `ctl harvest run` decided from its flags (times in seconds)."""

    partitions: tuple[str, ...]
    gres_types: Mapping[str, str]                 # Slurm GRES type -> pool GPU type ("" = do not harvest it)
    gpu_memory_gib: Mapping[str, float]           # pool GPU type -> memory per GPU
    interval_s: float = 60.0
    idle_release_after_s: float = 900.0
    pending_timeout_s: float = 900.0
    join_timeout_s: float = 900.0                 # running, but no agent registered yet
    drain_timeout_s: float = 120.0                # releasing: cancel after the drain or after this long
    budget_gpu_hours_per_day: float = 0.0         # 0 = unlimited
    max_jobs: int = 4
    time_limit_s: int = 4 * 3600
    start_latency_s: float = 300.0                # submit -> serving, paid for without serving
    max_gpus_per_job: int = 8
    job_name: str = "modelpool-harvest"

    @property
    def time_limit_h(self) -> float:
        """The job time limit in hours."""
        return self.time_limit_s / 3600.0


@dataclass(frozen=True)
class PoolView:
    """What the harvester knows of the pool (read from etcd at one revision)."""

    snapshot: Snapshot                            # the planner's snapshot: nodes, models, demand, prices
    node_by_job: Mapping[str, str] = field(default_factory=dict)    # Slurm job id -> node id of its agent
    busy_nodes: frozenset[str] = frozenset()      # nodes with a desired assignment (their GPUs carry one)
    nodes_with_instances: frozenset[str] = frozenset()  # nodes still running an engine (drain not done)
    drained_by_us: frozenset[str] = frozenset()   # nodes with a NodeControl drain written by the harvester


@dataclass(frozen=True)
class SlurmView:
    """What Slurm said this round."""

    nodes: tuple[SlurmNode, ...]
    jobs: Mapping[str, SlurmJobInfo]              # our jobs (by job name), by id


@dataclass(frozen=True)
class Submit:
    """A pool job to submit: ``--partition P --gres=gpu:SLURM_TYPE:GPUS``."""

    partition: str
    slurm_type: str
    gpu_type: str
    gpus: int
    models: tuple[str, ...]
    reason: str
    price_per_gpu_hour: float


@dataclass(frozen=True)
class Drain:
    """Ask a harvested job's agent to take no new work (its GPUs went idle); cancelled later."""

    job_id: str
    node_id: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    """``scancel`` a harvested job."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Budget:
    """GPU-hours in the rolling 24 h window."""

    limit: float                                  # 0 = unlimited
    used: float
    reserved: float

    @property
    def left(self) -> float:
        """GPU-hours a new job may still reserve (inf when unlimited)."""
        return float("inf") if self.limit <= 0 else max(0.0, self.limit - self.used - self.reserved)


@dataclass
class HarvestPlan:
    """What one round decided, and why."""

    submits: list[Submit] = field(default_factory=list)
    drains: list[Drain] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    records: dict[str, HarvestJob] = field(default_factory=dict)   # records to write (changed), by job id
    deletes: list[str] = field(default_factory=list)               # records to delete (out of the window)
    clear_controls: list[str] = field(default_factory=list)        # our NodeControl drains to delete
    budget: Budget = field(default_factory=lambda: Budget(0.0, 0.0, 0.0))
    unmet_rps: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    active_jobs: int = 0

    @property
    def changes(self) -> bool:
        """True when the plan submits, drains or cancels something (`ctl harvest plan` exit 1)."""
        return bool(self.submits or self.drains or self.cancels)


# -- budget arithmetic ------------------------------------------------------------------------------


def run_hours(job: HarvestJob, now_ms: int, window_s: float = WINDOW_S) -> float:
    """GPU-hours of ``job`` inside the window ending at ``now_ms`` (earlier runs counted in full)."""
    total = job.gpu_hours
    if job.started_unix_ms:
        end = job.ended_unix_ms or now_ms
        start = max(job.started_unix_ms, now_ms - int(window_s * 1000))
        total += max(0, end - start) / 3.6e6 * job.gpu_count
    return total


def total_hours(job: HarvestJob, now_ms: int) -> float:
    """All GPU-hours ``job`` ran, window or not."""
    end = job.ended_unix_ms or now_ms
    current = max(0, end - job.started_unix_ms) / 3.6e6 * job.gpu_count if job.started_unix_ms else 0.0
    return job.gpu_hours + current


def reserved_hours(job: HarvestJob, now_ms: int) -> float:
    """GPU-hours ``job`` may still run before its time limit (0 once ended)."""
    if job.state not in ACTIVE:
        return 0.0
    limit_ms = job.time_limit_s * 1000
    end = (job.started_unix_ms + limit_ms) if job.started_unix_ms else (now_ms + limit_ms)
    return max(0, end - now_ms) / 3.6e6 * job.gpu_count


def budget_of(jobs: Mapping[str, HarvestJob], limit: float, now_ms: int, window_s: float = WINDOW_S) -> Budget:
    """The budget as these job records spend it."""
    return Budget(limit=limit, used=sum(run_hours(j, now_ms, window_s) for j in jobs.values()),
                  reserved=sum(reserved_hours(j, now_ms) for j in jobs.values()))
