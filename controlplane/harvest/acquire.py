"""What to acquire: idle Slurm GPUs as obtainable capacity next to the pool's own (pure).

    pool snapshot ─┬─ + in-flight jobs (pending, or running before their agent joined) as nodes
                   │   they will be, so the same demand is not acquired twice
    Slurm nodes ───┴─ obtainable: idle GPUs per (node, GRES type) in --partition order, minus what
                      pending jobs of ours will take, capped at --max-gpus-per-job
                   ──▶ acquire(...) ──▶ submits (partition, type, GPUs, models, reason), unmet demand

Obtainable GPUs cost their price per hour plus, once, the GPU-time paid while the job starts
(``start_latency_s``), so GPUs the pool already holds are always preferred at equal price.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from controlplane.harvest.model import HarvestSettings, Submit
from controlplane.harvest.slurm import SlurmNode
from controlplane.pb import HarvestJob, HarvestJobState
from controlplane.planner.obtainable import AcquiredJob, ObtainableClass, ObtainableSpec
from controlplane.planner.snapshot import (
    GpuInfo,
    NodeInfo,
    Snapshot,
    ThroughputTable,
    gpu_type_allowed,
    tp_options,
)

S = HarvestJobState
IN_FLIGHT_PREFIX = "harvest-job-"


@dataclass(frozen=True)
class Obtainable:
    """Idle GPUs of one type on one Slurm node: one job could get up to ``gpus`` of them."""

    partition: str
    node: str
    slurm_type: str
    gpu_type: str
    gpus: int
    memory_gib: float
    price_per_gpu_hour: float


@dataclass
class Acquisition:
    """What `acquire` chose, and why nothing more."""

    submits: list[Submit] = field(default_factory=list)
    unmet_rps: dict[str, float] = field(default_factory=dict)   # demand left unserved after the submits
    notes: list[str] = field(default_factory=list)
    blocked_by_budget: bool = False
    blocked_by_jobs: bool = False


def with_in_flight(snapshot: Snapshot, jobs: Iterable[HarvestJob], st: HarvestSettings, now: float) -> Snapshot:
    """``snapshot`` plus a node for every job that will bring GPUs but has no agent yet."""
    extra: list[NodeInfo] = []
    known = {n.node_id for n in snapshot.nodes}
    for job in jobs:
        if job.state not in (S.HARVEST_PENDING, S.HARVEST_RUNNING) or job.gpu_type not in snapshot.gpu_types:
            continue
        if job.node_id and job.node_id in known:
            continue  # joined: it is an ordinary pool node now
        memory = st.gpu_memory_gib.get(job.gpu_type, 0.0)
        if memory <= 0 or job.gpu_count <= 0:
            continue
        start = job.started_unix_ms / 1000 if job.started_unix_ms else now
        extra.append(NodeInfo(
            node_id=f"{IN_FLIGHT_PREFIX}{job.job_id}",
            gpus=tuple(GpuInfo(index=i, type=job.gpu_type, memory_gib=memory) for i in range(job.gpu_count)),
            free_gpu_indices=tuple(range(job.gpu_count)), end_time_unix=int(start + job.time_limit_s)))
    if not extra:
        return snapshot
    return snapshot.model_copy(update={"nodes": (*snapshot.nodes, *extra)})


def obtainable_capacity(nodes: Sequence[SlurmNode], jobs: Iterable[HarvestJob], st: HarvestSettings,
                        snapshot: Snapshot) -> list[Obtainable]:
    """Idle GPUs a new job could get, per node and type (module docstring)."""
    bins: list[Obtainable] = []
    for node in sorted(nodes, key=lambda n: n.name):
        partition = next((p for p in st.partitions if p in node.partitions), None)
        if partition is None:
            continue
        for slurm_type, idle in sorted(node.idle_gpus().items()):
            gpu_type = st.gres_types.get(slurm_type, "")
            if idle <= 0 or not gpu_type or gpu_type not in snapshot.gpu_types:
                continue
            bins.append(Obtainable(partition, node.name, slurm_type, gpu_type, idle,
                                   st.gpu_memory_gib.get(gpu_type, 0.0),
                                   snapshot.gpu_types[gpu_type].price_per_hour))
    # Our pending jobs will take idle GPUs of their type once Slurm starts them.
    for job in jobs:
        if job.state != S.HARVEST_PENDING or job.started_unix_ms:
            continue
        fits = [i for i, b in enumerate(bins) if b.slurm_type == job.slurm_gres_type and b.gpus >= job.gpu_count]
        if fits:
            i = max(fits, key=lambda k: bins[k].gpus)
            b = bins[i]
            bins[i] = Obtainable(b.partition, b.node, b.slurm_type, b.gpu_type, b.gpus - job.gpu_count,
                                 b.memory_gib, b.price_per_gpu_hour)
    return [Obtainable(b.partition, b.node, b.slurm_type, b.gpu_type, min(b.gpus, st.max_gpus_per_job),
                       b.memory_gib, b.price_per_gpu_hour) for b in bins if b.gpus > 0 and b.memory_gib > 0]


def acquire(snapshot: Snapshot, capacity: Sequence[Obtainable], st: HarvestSettings, now: float, *,
            max_new_jobs: int, gpu_hours_left: float, time_limit_s: float = 5.0) -> Acquisition:
    """Choose the jobs to submit: ONE MILP (the planner's, controlplane/planner/obtainable.py) where
    the idle Slurm GPUs are obtainable classes next to the pool's GPUs, so acquiring and placing
    are one decision under the GPU-hours left and --max-jobs."""
    from controlplane.planner.model import plan_with_obtainable

    out = Acquisition()
    classes, where = obtainable_classes(capacity)
    spec = ObtainableSpec(classes=tuple(classes), start_latency_s=st.start_latency_s, gpu_hours_left=gpu_hours_left,
                          time_limit_h=st.time_limit_h, max_jobs=max_new_jobs)
    result = plan_with_obtainable(snapshot, now, spec, time_limit_s=time_limit_s)
    pool_served = {m: c.served_rps for m, c in result.plan.coverage.items()}
    table = ThroughputTable(snapshot)
    for job in result.jobs:
        partition, slurm_type = where[job.class_id]
        models = tuple(sorted({m for m, _ in job.replicas}))
        out.submits.append(Submit(partition, slurm_type, job.gpu_type, job.gpus, models,
                                  _reason(snapshot, table, job, pool_served), classes_price(classes, job.class_id)))
    out.unmet_rps = dict(result.unmet_rps)
    if out.unmet_rps:
        _why_unmet(snapshot, capacity, st, now, spec, out, time_limit_s)
    return out


def obtainable_classes(capacity: Sequence[Obtainable]) -> tuple[list[ObtainableClass], dict[str, tuple[str, str]]]:
    """Identical slots grouped: (partition, Slurm type, GPUs, memory, price) -> one class."""
    counts: dict[tuple[str, str, str, int, float, float], int] = {}
    for b in capacity:
        key = (b.partition, b.slurm_type, b.gpu_type, b.gpus, b.memory_gib, b.price_per_gpu_hour)
        counts[key] = counts.get(key, 0) + 1
    classes, where = [], {}
    for (partition, slurm_type, gpu_type, gpus, memory, price), n in sorted(counts.items()):
        class_id = f"{partition}/{slurm_type}/{gpus}"
        classes.append(ObtainableClass(class_id, gpu_type, memory, gpus, n, price))
        where[class_id] = (partition, slurm_type)
    return classes, where


def classes_price(classes: Sequence[ObtainableClass], class_id: str) -> float:
    """The price per GPU-hour of a class."""
    return next(c.price_per_gpu_hour for c in classes if c.class_id == class_id)


def _reason(snapshot: Snapshot, table: ThroughputTable, job: AcquiredJob, pool_served: dict[str, float]) -> str:
    parts = []
    for model in sorted({m for m, _ in job.replicas}):
        info = snapshot.model(model)
        reps = [tp for m, tp in job.replicas if m == model]
        rps = sum(table.rps(info, job.gpu_type, tp) for tp in reps) if info is not None else 0.0
        tps = "/".join(str(t) for t in sorted(set(reps)))
        parts.append(f"{model}: {snapshot.demand.get(model, 0.0):.2f} req/s demand, {pool_served.get(model, 0.0):.2f} "
                     f"served by the pool; {len(reps)} replica(s) at TP {tps} here add {rps:.2f} req/s")
    price = job.gpus * snapshot.gpu_types[job.gpu_type].price_per_hour
    return "; ".join(parts) + f" ({job.gpus}x {job.gpu_type}, {price:.2f}/h)"


def _why_unmet(snapshot: Snapshot, capacity: Sequence[Obtainable], st: HarvestSettings, now: float,
               spec: ObtainableSpec, out: Acquisition, time_limit_s: float) -> None:
    """Demand is left unmet: say whether no idle type can host it, or the budget / --max-jobs held it back
    (by solving once more without those two limits)."""
    from controlplane.planner.model import plan_with_obtainable

    hostable = set()
    for name in out.unmet_rps:
        model = snapshot.model(name)
        if model is None:
            continue
        if any(gpu_type_allowed(model, b.gpu_type) and any(tp <= b.gpus for tp in tp_options(model, b.memory_gib))
               for b in capacity):
            hostable.add(name)
        else:
            out.notes.append(f"{name}: {out.unmet_rps[name]:.2f} req/s unmet and no idle Slurm GPU in "
                             f"{', '.join(st.partitions)} can host it")
    limited = math.isfinite(spec.gpu_hours_left) or spec.max_jobs < (1 << 30)
    if not hostable or not limited:
        return
    free = replace(spec, gpu_hours_left=math.inf, max_jobs=1 << 30)
    wider = plan_with_obtainable(snapshot, now, free, time_limit_s=time_limit_s)
    gpus = sum(j.gpus for j in wider.jobs)
    if gpus * spec.time_limit_h > spec.gpu_hours_left + 1e-9:
        out.blocked_by_budget = True
    if len(wider.jobs) > spec.max_jobs:
        out.blocked_by_jobs = True


def acquire_greedy(snapshot: Snapshot, capacity: Sequence[Obtainable], st: HarvestSettings, now: float, *,
                   max_new_jobs: int, gpu_hours_left: float, time_limit_s: float = 5.0) -> Acquisition:
    """A baseline (bench/harvest_sim.py): plan the pool as it is, then cover each model's unmet
    demand with the cheapest job that covers it (or covers the most per cost), models by unmet
    demand descending: acquiring and placing as two decisions."""
    from controlplane.planner.model import compute_plan

    out = Acquisition()
    plan = compute_plan(snapshot, now, time_limit_s=time_limit_s)
    unmet = {m: c.demand_rps - c.served_rps for m, c in plan.coverage.items() if c.demand_rps - c.served_rps > 1e-6}
    table = ThroughputTable(snapshot)
    left = {i: b.gpus for i, b in enumerate(capacity)}
    gpus_left = math.inf if math.isinf(gpu_hours_left) else math.floor(gpu_hours_left / st.time_limit_h + 1e-9)
    jobs_left = max_new_jobs
    for name in sorted(unmet, key=lambda m: (-unmet[m], m)):
        model = snapshot.model(name)
        if model is None:
            continue
        best: tuple[tuple[float, ...], Submit, int, float] | None = None
        feasible_somewhere = False
        for i, b in enumerate(capacity):
            if not gpu_type_allowed(model, b.gpu_type):
                continue
            for tp in tp_options(model, b.memory_gib):
                if tp > b.gpus:
                    continue
                feasible_somewhere = True
                rps = table.rps(model, b.gpu_type, tp)
                if rps <= 0 or tp > left[i] or tp > gpus_left or jobs_left <= 0:
                    continue
                want = math.ceil(unmet[name] / rps - 1e-9) * tp
                cap = min(left[i], gpus_left) // tp * tp
                gpus = int(min(want, cap))
                served = min(unmet[name], gpus // tp * rps)
                cost = gpus * b.price_per_gpu_hour * (1 + st.start_latency_s / 3600)
                key = (0.0 if served >= unmet[name] - 1e-9 else 1.0, cost if served >= unmet[name] - 1e-9
                       else -served / max(cost, 1e-9), cost, float(i))
                if best is None or key < best[0]:
                    best = (key, Submit(b.partition, b.slurm_type, b.gpu_type, gpus, (name,),
                                        f"{name}: {unmet[name]:.2f} req/s unmet; {gpus // tp} replica(s) at TP {tp} "
                                        f"on {b.gpu_type} serve {served:.2f} req/s for "
                                        f"{gpus * b.price_per_gpu_hour:.2f}/h", b.price_per_gpu_hour), i, served)
        if best is None:
            if not feasible_somewhere:
                out.notes.append(f"{name}: {unmet[name]:.2f} req/s unmet and no idle Slurm GPU in "
                                 f"{', '.join(st.partitions)} can host it")
            elif jobs_left <= 0:
                out.blocked_by_jobs = True
            else:
                out.blocked_by_budget = out.blocked_by_budget or gpus_left < math.inf
            out.unmet_rps[name] = unmet[name]
            continue
        _, submit, i, served = best
        left[i] -= submit.gpus
        gpus_left -= submit.gpus
        jobs_left -= 1
        out.submits.append(submit)
        rest = unmet[name] - served
        if rest > 1e-6:
            out.unmet_rps[name] = rest
    return out
