"""Benchmark the MILP planner against the two baselines on seeded synthetic snapshots.

    python bench/planner_bench.py --sizes 10,100,1000 --models 10,60,100

For every (nodes, models) pair it generates a snapshot (a realistic GPU mix, heavy-tailed model
sizes and demand, some partly busy / leaving / draining nodes), runs `compute_plan`,
`plan_single_best_type` and `plan_greedy`, and prints one table row. With --replan it also
re-plans with the MILP plan running and demand perturbed by +-20% (the churn case: nodes with
running replicas cannot be aggregated). Numbers in docs/planner.md come from this script.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

from controlplane.logsetup import configure_logging
from controlplane.planner import (
    ActionKind,
    GpuInfo,
    GpuTypeInfo,
    ModelInfo,
    NodeInfo,
    Plan,
    RunningReplica,
    Snapshot,
    compute_plan,
    plan_greedy,
    plan_single_best_type,
)

NOW = 1_800_000_000.0

#: GPU type -> (price per GPU-hour, relative speed, memory GiB, share of nodes, GPUs per node choices)
GPU_MIX: dict[str, tuple[float, float, float, float, tuple[int, ...]]] = {
    "A100-80GB": (1.80, 2.0, 80, 0.25, (4, 8)),
    "A100-40GB": (1.20, 1.6, 40, 0.15, (4, 8)),
    "GH200": (3.20, 3.6, 96, 0.08, (4,)),
    "H100": (2.60, 3.0, 80, 0.17, (4, 8)),
    "RTX4090": (0.35, 0.9, 24, 0.20, (4, 8)),
    "L40S": (0.90, 1.3, 48, 0.15, (4, 8)),
}

#: (name stem, weights GiB, share of catalog)
MODEL_SIZES: tuple[tuple[str, float, float], ...] = (
    ("3b", 6, 0.15),
    ("8b", 16, 0.35),
    ("14b", 28, 0.20),
    ("32b", 64, 0.12),
    ("70b", 140, 0.10),
    ("8x7b", 93, 0.05),
    ("405b-fp8", 410, 0.03),
)


def synthetic_snapshot(n_nodes: int, n_models: int, seed: int, load: float = 0.5) -> Snapshot:
    """A seeded synthetic pool; `load` is roughly the share of pool GPUs the demand needs."""
    rng = random.Random(seed)
    gpu_types = {t: GpuTypeInfo(price_per_hour=p, relative_speed=s) for t, (p, s, _, _, _) in GPU_MIX.items()}
    types = list(GPU_MIX)
    nodes = []
    for i in range(n_nodes):
        gtype = rng.choices(types, weights=[GPU_MIX[t][3] for t in types])[0]
        _, _, mem, _, counts = GPU_MIX[gtype]
        count = rng.choice(counts)
        gpus = tuple(GpuInfo(index=j, type=gtype, memory_gib=mem) for j in range(count))
        busy = rng.random() < 0.2
        free = tuple(sorted(rng.sample(range(count), rng.randint(1, count)))) if busy else tuple(range(count))
        r = rng.random()
        end = 0 if r < 0.5 else int(NOW + (600 if r < 0.6 else rng.randint(4, 48) * 3600))
        nodes.append(
            NodeInfo(
                node_id=f"n{i:04d}", gpus=gpus, free_gpu_indices=free, end_time_unix=end, draining=rng.random() < 0.02
            )
        )
    models = []
    for i in range(n_models):
        stem, weights, _ = rng.choices(MODEL_SIZES, weights=[s for _, _, s in MODEL_SIZES])[0]
        allowed: tuple[str, ...] = ()
        if rng.random() < 0.2:
            allowed = tuple(sorted(rng.sample(types, rng.randint(2, 4))))
        models.append(
            ModelInfo(
                name=f"m{i:03d}-{stem}",
                weight_memory_gib=weights,
                kv_memory_gib=round(weights * rng.uniform(0.1, 0.3), 1),
                min_replicas=rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0],
                max_replicas=0,
                allowed_gpu_types=allowed,
                reference_rps=round(60.0 / weights, 3),
            )
        )
    # Heavy-tailed demand (Pareto), scaled so the demand needs about `load` of the pool's GPUs.
    raw = [rng.paretovariate(1.2) if rng.random() < 0.85 else 0.0 for _ in models]
    pool_gpus = sum(len(n.gpus) for n in nodes)
    gpu_need = sum(r / (m.reference_rps * 2.0) * max(1.0, m.memory_gib / 80) for r, m in zip(raw, models, strict=True))
    scale = load * pool_gpus / gpu_need if gpu_need > 0 else 0.0
    demand = {m.name: round(r * scale, 3) for r, m in zip(raw, models, strict=True) if r > 0}
    return Snapshot(nodes=tuple(nodes), models=tuple(models), gpu_types=gpu_types, demand=demand, horizon_s=1800)


def replan_snapshot(snapshot: Snapshot, plan: Plan, seed: int) -> Snapshot:
    """The same pool with `plan` running (its GPUs no longer free) and demand moved by +-20%."""
    rng = random.Random(seed)
    running = tuple(
        RunningReplica(node_id=a.node_id, model=a.model, tp=a.tp, gpu_indices=a.gpu_indices, replica_id=f"r{i}")
        for i, a in enumerate(plan.actions)
        if a.kind is not ActionKind.STOP
    )
    used: dict[str, set[int]] = {}
    for r in running:
        used.setdefault(r.node_id, set()).update(r.gpu_indices)
    nodes = tuple(
        n.model_copy(
            update={"free_gpu_indices": tuple(i for i in n.free_gpu_indices if i not in used.get(n.node_id, ()))}
        )
        for n in snapshot.nodes
    )
    demand = {m: round(d * rng.uniform(0.8, 1.2), 3) for m, d in snapshot.demand.items()}
    return snapshot.model_copy(update={"nodes": nodes, "current": running, "demand": demand})


@dataclass
class Row:
    nodes: int
    models: int
    case: str
    milp: Plan
    best: Plan
    greedy: Plan


def _fmt_cost(p: Plan) -> str:
    return f"{p.cost_per_hour:9.1f}"


def _per_rps(p: Plan) -> str:
    served = sum(c.served_rps for c in p.coverage.values())
    return f"{p.cost_per_hour / served:.3f}" if served > 0 else "-"


def _fmt_gap(p: Plan) -> str:
    return "-" if p.mip_gap is None else f"{100 * p.mip_gap:.2f}%"


def _fmt_cov(p: Plan) -> str:
    return f"{100 * p.served_fraction:5.1f}%"


def _ratio(a: Plan, b: Plan) -> str:
    return f"{a.cost_per_hour / b.cost_per_hour:5.2f}" if b.cost_per_hour > 0 else "    -"


def print_table(rows: list[Row]) -> None:
    """One row per benchmark case, Markdown so it pastes into docs/planner.md."""
    print(
        "| nodes | models | case | MILP status | gap | MILP time s | MILP $/h | best-type $/h | greedy $/h "
        "| MILP cov | best-type cov | greedy cov | MILP/best | MILP/greedy | $/h per req/s MILP / best / greedy "
        "| MILP obj | greedy obj | changes |"
    )
    print("|" + "---|" * 18)
    for r in rows:
        print(
            f"| {r.nodes} | {r.models} | {r.case} | {r.milp.status} | {_fmt_gap(r.milp)} | {r.milp.solve_time_s:.2f} "
            f"| {_fmt_cost(r.milp)} "
            f"| {_fmt_cost(r.best)} | {_fmt_cost(r.greedy)} | {_fmt_cov(r.milp)} | {_fmt_cov(r.best)} "
            f"| {_fmt_cov(r.greedy)} | {_ratio(r.milp, r.best)} | {_ratio(r.milp, r.greedy)} "
            f"| {_per_rps(r.milp)} / {_per_rps(r.best)} / {_per_rps(r.greedy)} "
            f"| {r.milp.objective:.0f} | {r.greedy.objective:.0f} | {len(r.milp.changes)} |"
        )
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every size, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="comma-separated node counts")
    ap.add_argument("--models", default="10,60,100", help="comma-separated model counts")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--load", type=float, default=0.5, help="share of pool GPUs the demand needs (about)")
    ap.add_argument("--time-limit", type=float, default=10.0, help="MILP time limit per plan, seconds")
    ap.add_argument("--replan", action="store_true", help="also re-plan with the MILP plan running")
    args = ap.parse_args(argv)
    configure_logging(level="warning")
    rows: list[Row] = []
    for n in (int(s) for s in args.sizes.split(",")):
        for m in (int(s) for s in args.models.split(",")):
            snap = synthetic_snapshot(n, m, seed=args.seed * 1000 + n + m, load=args.load)
            t0 = time.perf_counter()
            milp = compute_plan(snap, NOW, time_limit_s=args.time_limit)
            wall = time.perf_counter() - t0
            rows.append(Row(n, m, "fresh", milp, plan_single_best_type(snap, NOW), plan_greedy(snap, NOW)))
            print_progress(rows[-1], wall)
            if args.replan:
                snap2 = replan_snapshot(snap, milp, seed=args.seed)
                milp2 = compute_plan(snap2, NOW, time_limit_s=args.time_limit)
                rows.append(Row(n, m, "replan", milp2, plan_single_best_type(snap2, NOW), plan_greedy(snap2, NOW)))
                print_progress(rows[-1], milp2.solve_time_s)
    print()
    print_table(rows)
    return 0


def print_progress(row: Row, wall: float) -> None:
    """A progress line on stderr while the table builds."""
    print(
        f"# {row.nodes} nodes x {row.models} models ({row.case}): MILP {row.milp.status} in {wall:.2f}s, "
        f"objective {row.milp.objective:.1f} vs greedy {row.greedy.objective:.1f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
