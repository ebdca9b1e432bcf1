"""Obtainable capacity in the planner's MILP: GPUs that are not in the pool yet but could be
acquired (idle Slurm GPUs, `ctl harvest`), at their price plus a start penalty, under a budget
of GPU-hours and a number of jobs. One MILP then decides acquiring and placing together.

A *class* is a set of identical job slots: ``slots`` jobs of at most ``gpus`` GPUs of one type
(e.g. 3 idle nodes with 2 idle A100s each in partition gpu). Its columns and rows, added to the
planner's model (milp.py ``solve_units(obtainable=...)``), for class c:

    x[c,m,t]  integer  replicas of model m at TP t placed on acquired GPUs of c
    j[c]      integer  jobs acquired from c, 0..slots
    packing   sum_{t'>=t} t'*x[c,.,t'] <= t*floor(gpus/t) * j[c]     for each TP degree t in use
    budget    sum_c sum t*x[c,.,t] * time_limit_h <= gpu_hours_left  (a job reserves its whole limit)
    jobs      sum_c j[c] <= max_jobs
    cost      x: (price + price*start_latency_h) * t + churn_penalty; j: job_penalty

x enters the same demand, min_replicas (=1) and max_replicas rows and the hourly budget row as
the pool's own replicas. The packing rows are the class argument of model.py with ``j[c]``
identical bins: TP degrees are powers of two, so replicas placed largest TP first into any of
the ``j[c]`` bins with room always fit while the rows hold (``bind_obtainable``), and each bin
in use is one job of exactly its load. What this does not model: distinct-node spread for
``min_replicas >= 2`` (acquired replicas count towards demand and a minimum of 1 only).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pulp

from controlplane.planner.diff import PlanningError, ReplicaKey
from controlplane.planner.snapshot import Snapshot, ThroughputTable, gpu_type_allowed, tp_options


@dataclass(frozen=True)
class ObtainableClass:
    """Identical job slots of one GPU type: up to ``slots`` jobs of up to ``gpus`` GPUs each."""

    class_id: str                 # e.g. "gpu/a100/2"; carried back into the acquisitions
    gpu_type: str                 # the pool's name (priced in snapshot.gpu_types)
    memory_gib: float
    gpus: int
    slots: int
    price_per_gpu_hour: float


@dataclass(frozen=True)
class ObtainableSpec:
    """The classes and the limits on acquiring from them."""

    classes: tuple[ObtainableClass, ...]
    start_latency_s: float = 0.0          # paid for without serving: price * GPUs * latency, once
    gpu_hours_left: float = math.inf      # budget left for new jobs (each reserves gpus * time limit)
    time_limit_h: float = 1.0
    max_jobs: int = 1 << 30
    job_penalty: float = 1e-3             # per job: of two equal acquisitions, fewer jobs


@dataclass(frozen=True)
class AcquiredJob:
    """One job to acquire: its class, GPU count, and the replicas the plan puts on it."""

    class_id: str
    gpu_type: str
    gpus: int
    replicas: tuple[tuple[str, int], ...]   # (model, tp), largest TP first


@dataclass
class ObtainableColumns:
    """The columns `add_obtainable` made, for reading the solution back."""

    x: dict[tuple[int, ReplicaKey], pulp.LpVariable] = field(default_factory=dict)
    jobs: dict[int, pulp.LpVariable] = field(default_factory=dict)


NewVar = Callable[[float, float | None, bool, float], pulp.LpVariable]


def add_obtainable(prob: pulp.LpProblem, objective: dict[pulp.LpVariable, float], start: dict[pulp.LpVariable, float],
                   new_var: NewVar, snapshot: Snapshot, table: ThroughputTable, spec: ObtainableSpec,
                   rps_terms: dict[str, list[tuple[pulp.LpVariable, float]]],
                   model_terms: dict[str, list[pulp.LpVariable]],
                   budget_terms: list[tuple[pulp.LpVariable, float]]) -> ObtainableColumns:
    """Add the columns and rows of the module docstring to a model under construction.

    ``new_var(low, up, integer, warm)`` makes a variable (milp.py's builder); ``objective`` and
    ``start`` are the builder's objective coefficients and warm start (all zero here: acquiring
    nothing is feasible, so the warm start stays valid)."""
    make = new_var
    cols = ObtainableColumns()
    w = snapshot.weights
    latency_h = spec.start_latency_s / 3600.0
    gpu_hours: list[tuple[pulp.LpVariable, float]] = []
    for ci, c in enumerate(spec.classes):
        if c.slots <= 0 or c.gpus <= 0:
            continue
        jv = make(0, c.slots, True, 0.0)
        cols.jobs[ci] = jv
        objective[jv] += spec.job_penalty
        per_tp: dict[int, list[pulp.LpVariable]] = defaultdict(list)
        for model in snapshot.models:
            if not gpu_type_allowed(model, c.gpu_type):
                continue
            for tp in tp_options(model, c.memory_gib):
                if tp > c.gpus:
                    continue
                upper = c.slots * (c.gpus // tp)
                if model.max_replicas:
                    upper = min(upper, model.max_replicas)
                xv = make(0, upper, True, 0.0)
                cols.x[(ci, (model.name, tp, c.gpu_type))] = xv
                objective[xv] += c.price_per_gpu_hour * tp * (1 + latency_h) + w.churn_penalty
                rps_terms[model.name].append((xv, table.rps(model, c.gpu_type, tp)))
                model_terms[model.name].append(xv)
                budget_terms.append((xv, c.price_per_gpu_hour * tp))
                gpu_hours.append((xv, tp * spec.time_limit_h))
                per_tp[tp].append(xv)
        for t in sorted(per_tp):
            terms = [(v, tp) for tp, vs in per_tp.items() if tp >= t for v in vs]
            prob += pulp.LpAffineExpression([*terms, (jv, -t * (c.gpus // t))]) <= 0
    if gpu_hours and math.isfinite(spec.gpu_hours_left):
        prob += pulp.LpAffineExpression(gpu_hours) <= max(0.0, spec.gpu_hours_left)
    if cols.jobs and spec.max_jobs < (1 << 30):
        prob += pulp.lpSum(cols.jobs.values()) <= max(0, spec.max_jobs)
    for v in (*cols.x.values(), *cols.jobs.values()):
        start[v] = 0.0
    return cols


def read_obtained(cols: ObtainableColumns) -> tuple[dict[tuple[int, ReplicaKey], int], dict[int, int]]:
    """Replica counts and job counts of the solution (after a solve)."""
    x = {key: round(v.varValue or 0.0) for key, v in cols.x.items() if (v.varValue or 0.0) > 0.5}
    jobs = {ci: round(v.varValue or 0.0) for ci, v in cols.jobs.items() if (v.varValue or 0.0) > 0.5}
    return x, jobs


def bind_obtainable(spec: ObtainableSpec, obtained: dict[tuple[int, ReplicaKey], int],
                    jobs: dict[int, int]) -> list[AcquiredJob]:
    """Replicas per class into its acquired jobs: largest TP first, each into any job with room
    (never fails while the packing rows hold; see the module docstring). Empty jobs are dropped."""
    by_class: dict[int, Counter[ReplicaKey]] = defaultdict(Counter)
    for (ci, key), n in obtained.items():
        by_class[ci][key] += n
    out: list[AcquiredJob] = []
    for ci in sorted(by_class):
        c = spec.classes[ci]
        loads = [0] * jobs.get(ci, 0)
        hosted: list[list[tuple[str, int]]] = [[] for _ in loads]
        for (model, tp, _), n in sorted(by_class[ci].items(), key=lambda kv: (-kv[0][1], kv[0][0])):
            for _ in range(n):
                room = next((i for i, load in enumerate(loads) if load + tp <= c.gpus), None)
                if room is None:
                    raise PlanningError(f"obtainable packing rows violated in {c.class_id}")  # pragma: no cover
                loads[room] += tp
                hosted[room].append((model, tp))
        out.extend(AcquiredJob(c.class_id, c.gpu_type, load, tuple(reps))
                   for load, reps in zip(loads, hosted, strict=True) if load)
    return out


def obtainable_rps(snapshot: Snapshot, jobs: Sequence[AcquiredJob]) -> dict[str, float]:
    """Requests/s the acquired replicas add per model."""
    table = ThroughputTable(snapshot)
    models = {m.name: m for m in snapshot.models}
    out: dict[str, float] = defaultdict(float)
    for job in jobs:
        for model, tp in job.replicas:
            out[model] += table.rps(models[model], job.gpu_type, tp)
    return dict(out)
