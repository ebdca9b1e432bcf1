"""Two simple planners to measure the MILP against. Both return the same `Plan` type.

- `plan_single_best_type`: every replica on the fastest GPU type in the pool, enough replicas to
  cover each model's demand (and min_replicas), as many as fit. Ignores budget and churn.
- `plan_greedy`: models by demand, descending; each replica goes on the first node (by node_id)
  with a GPU type it is allowed on, fits in memory and has free GPUs for, until demand and
  min_replicas are covered. Ignores budget and churn.

Both respect hard limits: GPU counts, memory, allowed types, draining / leaving nodes, max_replicas.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable

from controlplane.planner.diff import Plan, ReplicaKey, available_gpus, build_plan
from controlplane.planner.snapshot import (
    ModelInfo,
    NodeInfo,
    Snapshot,
    ThroughputTable,
    gpu_type_allowed,
    tenant_allowed,
    tp_options,
)


class _Pool:
    """Free GPUs per (node, type) while a baseline places replicas."""

    def __init__(self, snapshot: Snapshot, now: float) -> None:
        self.nodes: list[NodeInfo] = sorted(
            (n for n in snapshot.nodes if snapshot.node_accepts_new(n, now)), key=lambda n: n.node_id
        )
        self.free: dict[tuple[str, str], int] = {}
        self.memory: dict[tuple[str, str], float] = {}
        self.tenant = {node.node_id: node.tenant for node in self.nodes}
        for node in self.nodes:
            for gtype, idx in available_gpus(snapshot, node).items():
                self.free[(node.node_id, gtype)] = len(idx)
                self.memory[(node.node_id, gtype)] = min(g.memory_gib for g in node.gpus if g.type == gtype)
        self.placement: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)

    def smallest_tp(self, model: ModelInfo, node_id: str, gtype: str) -> int | None:
        """The smallest TP option of `model` that fits memory and the free GPUs of (node, type)."""
        free = self.free.get((node_id, gtype), 0)
        if free == 0 or not gpu_type_allowed(model, gtype) or not tenant_allowed(model, self.tenant[node_id]):
            return None
        opts = [tp for tp in tp_options(model, self.memory[(node_id, gtype)]) if tp <= free]
        return opts[0] if opts else None

    def place(self, model: str, node_id: str, gtype: str, tp: int) -> None:
        self.free[(node_id, gtype)] -= tp
        self.placement[node_id][(model, tp, gtype)] += 1


def _fill(
    snapshot: Snapshot,
    pool: _Pool,
    table: ThroughputTable,
    types_for: Callable[[NodeInfo], list[str]],
) -> None:
    """Place each model's replicas (demand descending) on the first fitting node until covered."""
    order = sorted(snapshot.models, key=lambda m: (-snapshot.demand.get(m.name, 0.0), m.name))
    for model in order:
        demand = snapshot.demand.get(model.name, 0.0)
        capacity = 0.0
        hosts: set[str] = set()
        count = 0
        while capacity < demand or len(hosts) < model.min_replicas:
            if model.max_replicas and count >= model.max_replicas:
                break
            need_spread = len(hosts) < model.min_replicas
            spot = _first_fit(pool, model, types_for, avoid=hosts if need_spread else set())
            if spot is None and need_spread and capacity < demand:
                spot = _first_fit(pool, model, types_for, avoid=set())
            if spot is None:
                break
            node_id, gtype, tp = spot
            pool.place(model.name, node_id, gtype, tp)
            capacity += table.rps(model, gtype, tp)
            hosts.add(node_id)
            count += 1


def _first_fit(
    pool: _Pool, model: ModelInfo, types_for: Callable[[NodeInfo], list[str]], avoid: set[str]
) -> tuple[str, str, int] | None:
    for node in pool.nodes:
        if node.node_id in avoid:
            continue
        for gtype in types_for(node):
            tp = pool.smallest_tp(model, node.node_id, gtype)
            if tp is not None:
                return node.node_id, gtype, tp
    return None


def plan_single_best_type(snapshot: Snapshot, now: float) -> Plan:
    """Baseline (a): all replicas on the GPU type with the highest relative speed in the pool."""
    started = time.perf_counter()
    pool = _Pool(snapshot, now)
    present = {t for (_, t), c in pool.free.items() if c > 0}
    notes: list[str] = []
    if present:
        best = min(
            present, key=lambda t: (-snapshot.gpu_types[t].relative_speed, snapshot.gpu_types[t].price_per_hour, t)
        )
        notes.append(f"single GPU type: {best}")
        _fill(snapshot, pool, ThroughputTable(snapshot), lambda node: [best])
    return build_plan(
        snapshot,
        now,
        pool.placement,
        planner="single-best-type",
        status="baseline",
        solve_time_s=time.perf_counter() - started,
        notes=notes,
    )


def plan_greedy(snapshot: Snapshot, now: float) -> Plan:
    """Baseline (b): first-fit by node_id, models by demand descending, smallest fitting TP."""
    started = time.perf_counter()
    pool = _Pool(snapshot, now)
    types: dict[str, list[str]] = {
        n.node_id: sorted({t for (nid, t) in pool.free if nid == n.node_id}) for n in pool.nodes
    }
    _fill(snapshot, pool, ThroughputTable(snapshot), lambda node: types[node.node_id])
    return build_plan(
        snapshot,
        now,
        pool.placement,
        planner="greedy",
        status="baseline",
        solve_time_s=time.perf_counter() - started,
        notes=(),
    )
