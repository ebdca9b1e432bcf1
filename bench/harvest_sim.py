"""A day of harvesting in simulation: idle GPUs and demand curves through the real decision core.

    python bench/harvest_sim.py --step-min 10 --budget 600 --seed 1

No Slurm, no etcd, no clock: each round builds the views `decide` takes (Slurm nodes whose idle
GPUs follow a 24 h curve, the jobs it runs for us, the pool those jobs form, the demand), runs
`decide` (the one MILP of controlplane/harvest/acquire.py, or the place-then-acquire baseline),
carries its plan out on the simulated cluster, and lets the planner (`compute_plan`) place the
models on the pool. Job lifecycle: a submitted job starts at the next round if a node still has
the GPUs idle (else it stays pending, and --pending-timeout cancels it); a job whose GPUs Slurm
wants back (the idle curve drops below what we hold on that node) is preempted; jobs end at
their time limit.

Curves (the seed's shape): idle fraction per GPU type lowest at 17:00 and highest 03:00-07:00,
consumer cards idling most; demand per model peaks in working hours (10:00-16:00) and is low at
night. Reported per strategy: GPU-hours used, cost, demand served / unmet (requests), the most
GPU-hours in the 24 h window (never above the budget), jobs, preemptions; against a static
allocation sized for the peak demand and held all day.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.harvest.acquire import acquire, acquire_greedy
from controlplane.harvest.decide import Acquirer, decide
from controlplane.harvest.model import HarvestSettings, PoolView, SlurmView, budget_of
from controlplane.harvest.slurm import SlurmJobInfo, SlurmNode
from controlplane.logsetup import configure_logging
from controlplane.pb import HarvestJob, HarvestJobState
from controlplane.planner import (
    GpuInfo,
    GpuTypeInfo,
    ModelInfo,
    NodeInfo,
    RunningReplica,
    Snapshot,
    compute_plan,
)

S = HarvestJobState
DAY0 = 1_800_000_000 - 1_800_000_000 % 86400   # a UTC midnight: hours of the day are plain

#: pool type -> (Slurm type, price per GPU-hour, relative speed, memory GiB, nodes, GPUs per node, idle scale)
TYPES = {
    "A100-80GB": ("a100", 1.60, 2.0, 80.0, 12, 4, 0.7),
    "RTX4090": ("rtx4090", 0.40, 1.0, 24.0, 16, 8, 1.0),
    "RTX3090": ("rtx3090", 0.30, 0.7, 24.0, 10, 8, 1.0),
}
#: model -> (weights + KV GiB, requests/s of one TP=1 replica at speed 1, peak demand req/s)
MODELS = {"llama-8b": (18.0, 6.0, 40.0), "qwen-14b": (34.0, 3.0, 12.0), "llama-70b": (150.0, 1.0, 6.0),
          "embed": (4.0, 30.0, 60.0)}
#: idle fraction through the day (hour, fraction): trough at 17:00, plateau 03:00-07:00
IDLE_CURVE = ((0, 0.55), (3, 0.85), (7, 0.85), (10, 0.45), (14, 0.3), (17, 0.12), (20, 0.3), (24, 0.55))
#: demand through the day as a share of the peak
DEMAND_CURVE = ((0, 0.15), (6, 0.1), (9, 0.6), (11, 1.0), (15, 1.0), (18, 0.6), (21, 0.35), (24, 0.15))


def interp(curve: tuple[tuple[float, float], ...], hour: float) -> float:
    """Piecewise-linear value of ``curve`` at ``hour`` (0-24)."""
    for (h0, v0), (h1, v1) in itertools.pairwise(curve):
        if h0 <= hour <= h1:
            return v0 + (v1 - v0) * (hour - h0) / (h1 - h0)
    return curve[-1][1]


@dataclass
class SimJob:
    """One harvested job on the simulated cluster."""

    job_id: str
    gpu_type: str
    gpus: int
    submitted: float
    node: str = ""
    start: float = 0.0
    end: float = 0.0
    state: str = "PENDING"           # PENDING, RUNNING, CANCELLED, PREEMPTED, TIMEOUT
    draining: bool = False


@dataclass
class Result:
    """What one strategy did over the day."""

    name: str
    gpu_hours: float = 0.0
    cost: float = 0.0
    served: float = 0.0              # requests
    demand: float = 0.0
    max_window_gpu_hours: float = 0.0
    jobs: int = 0
    preempted: int = 0
    solve_s: float = 0.0
    by_type: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Cluster:
    """Slurm nodes whose idle GPUs follow the curve (seeded per-node noise), and our jobs on them."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.nodes = [(f"{t[:4].lower()}-{i:02d}", t, spec[5], spec[6], rng.uniform(-0.15, 0.15))
                      for t, spec in TYPES.items() for i in range(spec[4])]
        self.jobs: dict[str, SimJob] = {}
        self._next = 1

    def idle_for_others(self, hour: float) -> dict[str, int]:
        """GPUs per node that nobody else wants at ``hour``."""
        out = {}
        for name, _, gpus, scale, noise in self.nodes:
            frac = min(1.0, max(0.0, interp(IDLE_CURVE, hour) * scale + noise))
            out[name] = round(frac * gpus)
        return out

    def held(self) -> dict[str, int]:
        held: dict[str, int] = defaultdict(int)
        for j in self.jobs.values():
            if j.state == "RUNNING":
                held[j.node] += j.gpus
        return held

    def slurm_view(self, hour: float, job_name: str) -> tuple[list[SlurmNode], dict[str, SlurmJobInfo]]:
        idle, held = self.idle_for_others(hour), self.held()
        nodes = []
        for name, gtype, gpus, _, _ in self.nodes:
            slurm_type = TYPES[gtype][0]
            used = gpus - max(0, idle[name] - held[name])
            nodes.append(SlurmNode(name=name, state="MIXED" if used else "IDLE", partitions=("gpu",),
                                   gpus_total={slurm_type: gpus}, gpus_used={slurm_type: used}, cpus=64))
        jobs = {}
        for j in self.jobs.values():
            if j.state == "PENDING" or j.state == "RUNNING":
                jobs[j.job_id] = SlurmJobInfo(j.job_id, job_name, j.state, "gpu", {TYPES[j.gpu_type][0]: j.gpus},
                                              int(j.start), int(j.start + 4 * 3600) if j.start else 0, 4 * 3600,
                                              j.node, "None")
        return nodes, jobs

    def submit(self, gpu_type: str, gpus: int, now: float) -> str:
        job_id = str(self._next)
        self._next += 1
        self.jobs[job_id] = SimJob(job_id, gpu_type, gpus, now)
        return job_id

    def advance(self, hour: float, now: float, time_limit_s: float) -> int:
        """Start pending jobs that fit, preempt where others take GPUs back, end at the limit.
        Returns the number of preemptions."""
        idle, held = self.idle_for_others(hour), self.held()
        preempted = 0
        for name in held:
            while held[name] > idle[name]:
                victim = max((j for j in self.jobs.values() if j.state == "RUNNING" and j.node == name),
                             key=lambda j: j.start)
                victim.state, victim.end = "PREEMPTED", now
                held[name] -= victim.gpus
                preempted += 1
        for j in self.jobs.values():
            if j.state == "RUNNING" and now >= j.start + time_limit_s:
                j.state, j.end = "TIMEOUT", j.start + time_limit_s
                held[j.node] -= j.gpus
        for j in sorted(self.jobs.values(), key=lambda x: x.submitted):
            if j.state != "PENDING":
                continue
            for name, gtype, _, _, _ in self.nodes:
                if gtype == j.gpu_type and idle[name] - held[name] >= j.gpus:
                    j.state, j.node, j.start = "RUNNING", name, now
                    held[name] += j.gpus
                    break
        return preempted


def base_snapshot(demand: dict[str, float], nodes: tuple[NodeInfo, ...] = (),
                  current: tuple[RunningReplica, ...] = ()) -> Snapshot:
    return Snapshot(
        gpu_types={t: GpuTypeInfo(price_per_hour=s[1], relative_speed=s[2]) for t, s in TYPES.items()},
        models=tuple(ModelInfo(name=m, weight_memory_gib=v[0], reference_rps=v[1]) for m, v in MODELS.items()),
        demand=demand, nodes=nodes, current=current, horizon_s=900)


def pool_nodes(cluster: Cluster, now: float) -> tuple[NodeInfo, ...]:
    out = []
    for j in cluster.jobs.values():
        if j.state != "RUNNING":
            continue
        mem = TYPES[j.gpu_type][3]
        out.append(NodeInfo(node_id=f"job-{j.job_id}", gpus=tuple(GpuInfo(index=i, type=j.gpu_type, memory_gib=mem)
                                                                 for i in range(j.gpus)),
                            free_gpu_indices=tuple(range(j.gpus)), end_time_unix=int(j.start + 4 * 3600),
                            draining=j.draining))
    return tuple(out)


def simulate(name: str, acquirer: Acquirer, settings: HarvestSettings, step_s: float, seed: int) -> Result:
    """One day, one strategy."""
    cluster = Cluster(seed)
    records: dict[str, HarvestJob] = {}
    current: tuple[RunningReplica, ...] = ()
    res = Result(name)
    for k in range(int(86400 / step_s)):
        now = DAY0 + k * step_s
        hour = (k * step_s / 3600) % 24
        res.preempted += cluster.advance(hour, now, settings.time_limit_s)
        demand = {m: v[2] * interp(DEMAND_CURVE, hour) for m, v in MODELS.items()}
        nodes = pool_nodes(cluster, now)
        live = {n.node_id for n in nodes}
        current = tuple(r for r in current if r.node_id in live)
        snapshot = base_snapshot(demand, nodes, current)
        busy = frozenset(r.node_id for r in current)
        slurm_nodes, slurm_jobs = cluster.slurm_view(hour, settings.job_name)
        view = PoolView(snapshot=snapshot, node_by_job={j.job_id: f"job-{j.job_id}" for j in cluster.jobs.values()
                                                        if j.state == "RUNNING"},
                        busy_nodes=busy, nodes_with_instances=busy)
        started = time.perf_counter()
        plan = decide(view, SlurmView(tuple(slurm_nodes), slurm_jobs), records, settings, now, time_limit_s=2.0,
                      acquirer=acquirer)
        res.solve_s += time.perf_counter() - started
        # carry the plan out on the simulated cluster
        for d in plan.drains:
            cluster.jobs[d.job_id].draining = True
        for c in plan.cancels:
            job = cluster.jobs[c.job_id]
            job.end, job.state = (now if job.start else 0.0), "CANCELLED"
        records.update(plan.records)
        for job_id in plan.deletes:
            records.pop(job_id, None)
        for s in plan.submits:
            job_id = cluster.submit(s.gpu_type, s.gpus, now)
            records[job_id] = HarvestJob(job_id=job_id, state=S.HARVEST_PENDING, partition=s.partition,
                                         slurm_gres_type=s.slurm_type, gpu_type=s.gpu_type, gpu_count=s.gpus,
                                         models=list(s.models), submitted_unix_ms=int(now * 1000),
                                         time_limit_s=settings.time_limit_s, state_since_unix_ms=int(now * 1000))
            res.jobs += 1
        # the planner places the models on what the pool holds now
        pplan = compute_plan(snapshot, now, time_limit_s=2.0)
        current = tuple(RunningReplica(node_id=a.node_id, model=a.model, tp=a.tp, gpu_indices=a.gpu_indices,
                                       replica_id=a.replica_id or f"{a.node_id}-{a.model}-{a.gpu_indices}")
                        for a in pplan.actions if a.kind.value != "STOP")
        res.served += sum(c.served_rps for c in pplan.coverage.values()) * step_s
        res.demand += sum(demand.values()) * step_s
        window = budget_of(records, 0.0, int(now * 1000))
        res.max_window_gpu_hours = max(res.max_window_gpu_hours, window.used)
    for j in cluster.jobs.values():
        if j.start:
            hours = ((j.end or DAY0 + 86400) - j.start) / 3600 * j.gpus
            res.gpu_hours += hours
            res.by_type[j.gpu_type] += hours
            res.cost += hours * TYPES[j.gpu_type][1]
    return res


def static_for_peak() -> Result:
    """A fixed allocation sized for the peak demand (the planner on unlimited free nodes), all day."""
    peak = {m: v[2] for m, v in MODELS.items()}
    nodes = tuple(NodeInfo(node_id=f"s-{t}-{i}", gpus=tuple(GpuInfo(index=g, type=t, memory_gib=s[3])
                                                           for g in range(s[5])),
                           free_gpu_indices=tuple(range(s[5])))
                  for t, s in TYPES.items() for i in range(s[4]))
    plan = compute_plan(base_snapshot(peak, nodes), DAY0, time_limit_s=10.0)
    res = Result("static for the peak")
    for gtype, gpus in plan.gpus_used_by_type.items():
        res.by_type[gtype] = gpus * 24.0
        res.gpu_hours += gpus * 24.0
        res.cost += gpus * 24.0 * TYPES[gtype][1]
    res.max_window_gpu_hours = res.gpu_hours
    day = sum(interp(DEMAND_CURVE, h / 60) for h in range(24 * 60)) / (24 * 60) * 86400
    res.demand = sum(v[2] for v in MODELS.values()) * day
    res.served = res.demand * plan.served_fraction  # it holds the GPUs it needs at all times (no preemption)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-min", type=float, default=10.0, help="minutes per round")
    ap.add_argument("--budget", type=float, default=600.0, help="--budget-gpu-hours-per-day (0 = unlimited)")
    ap.add_argument("--max-jobs", type=int, default=24)
    ap.add_argument("--time-min", type=int, default=240)
    ap.add_argument("--idle-release-min", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    configure_logging(level="error", component="bench")
    settings = HarvestSettings(
        partitions=("gpu",), gres_types={s[0]: t for t, s in TYPES.items()},
        gpu_memory_gib={t: s[3] for t, s in TYPES.items()}, interval_s=args.step_min * 60,
        idle_release_after_s=args.idle_release_min * 60, pending_timeout_s=2 * args.step_min * 60,
        join_timeout_s=3600, drain_timeout_s=args.step_min * 60, budget_gpu_hours_per_day=args.budget,
        max_jobs=args.max_jobs, time_limit_s=args.time_min * 60, start_latency_s=300, job_name="sim")
    step = args.step_min * 60
    results = [simulate("harvest (one MILP)", acquire, settings, step, args.seed),
               simulate("harvest (place, then acquire)", acquire_greedy, settings, step, args.seed),
               static_for_peak()]
    static = results[-1]
    print(f"24 h, {args.step_min:g}-min rounds, budget {args.budget:g} GPU-h/day, --max-jobs {args.max_jobs}, "
          f"--time {args.time_min} min, idle release {args.idle_release_min:g} min, seed {args.seed}\n")
    print("| strategy | GPU-hours | by type | cost | cost vs static | demand served | unmet requests | "
          "max GPU-h in 24 h | jobs | preempted | decide s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        by_type = ", ".join(f"{t} {h:.0f}" for t, h in sorted(r.by_type.items()) if h > 0.05)
        print(f"| {r.name} | {r.gpu_hours:.0f} | {by_type} | {r.cost:.0f} | {r.cost / static.cost:.2f} | "
              f"{100 * r.served / r.demand:.1f}% | {r.demand - r.served:,.0f} | {r.max_window_gpu_hours:.0f} | "
              f"{r.jobs if r.jobs else '-'} | {r.preempted if r.jobs else '-'} | {r.solve_s:.1f} |")
    if args.budget > 0:
        for r in results[:2]:
            assert r.max_window_gpu_hours <= args.budget + 1e-6, f"{r.name} exceeded the budget"


if __name__ == "__main__":
    main()
