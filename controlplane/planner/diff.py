"""Desired placement vs running replicas -> a `Plan` of concrete START / STOP / KEEP actions.

Every planner (the MILP and the baselines) decides a `Placement`: how many replicas of each
(model, TP, GPU type) each node should run. `build_plan` diffs that against `Snapshot.current`,
binds new replicas to concrete GPU indices, and scores the result with one objective so plans
from different planners compare directly.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.planner.snapshot import (
    NodeInfo,
    RunningReplica,
    Snapshot,
    ThroughputTable,
    gpu_type_allowed,
    tenant_allowed,
    tp_options,
)

#: (model, tp, gpu_type) -> replica count, per node_id.
ReplicaKey = tuple[str, int, str]
Placement = Mapping[str, Mapping[ReplicaKey, int]]


class PlanningError(RuntimeError):
    """A placement cannot be realised (a planner bug, never bad input: input errors are SnapshotError)."""


class ActionKind(enum.StrEnum):
    """What to do with one replica."""

    START = "START"
    STOP = "STOP"
    KEEP = "KEEP"


@dataclass(frozen=True)
class Action:
    """One replica decision, with the GPUs it holds (KEEP/STOP) or is given (START)."""

    kind: ActionKind
    node_id: str
    model: str
    tp: int
    gpu_type: str
    gpu_indices: tuple[int, ...]
    replica_id: str = ""


@dataclass(frozen=True)
class ModelCoverage:
    """How well one model's demand is covered by a plan (only replicas on nodes that stay count)."""

    demand_rps: float
    capacity_rps: float
    replicas: int
    distinct_nodes: int
    min_replicas: int

    @property
    def served_rps(self) -> float:
        """Demand actually served: capacity, capped at demand."""
        return min(self.demand_rps, self.capacity_rps)

    @property
    def fraction(self) -> float:
        """served / demand; 1.0 when there is no demand."""
        return 1.0 if self.demand_rps <= 0 else self.served_rps / self.demand_rps

    @property
    def min_replicas_short(self) -> int:
        """How many distinct nodes are missing to reach min_replicas."""
        return max(0, self.min_replicas - self.distinct_nodes)


@dataclass(frozen=True)
class Plan:
    """A complete decision: actions plus what they cost and serve.

    `objective` is the planner objective evaluated on the final actions (cost + unmet-demand
    penalty + churn penalty + min-replica shortfall penalty), identical for every planner.
    `status` is the solver's: optimal, feasible (time limit hit), no_solution, or baseline.
    `solver_objective` is the MILP's own value (None for baselines), equal to `objective`; `mip_gap` is
    the relative gap the solver proved (0 = proven optimal; ``optimal`` means within the requested gap).
    """

    planner: str
    actions: tuple[Action, ...]
    cost_per_hour: float
    coverage: Mapping[str, ModelCoverage]
    gpus_used_by_type: Mapping[str, int]
    objective: float
    status: str
    solve_time_s: float
    notes: tuple[str, ...] = field(default=())
    solver_objective: float | None = None
    mip_gap: float | None = None

    @property
    def changes(self) -> tuple[Action, ...]:
        """Actions that change something (START and STOP)."""
        return tuple(a for a in self.actions if a.kind is not ActionKind.KEEP)

    @property
    def served_fraction(self) -> float:
        """Total served requests/s over total demand (1.0 without demand)."""
        demand = sum(c.demand_rps for c in self.coverage.values())
        served = sum(c.served_rps for c in self.coverage.values())
        return 1.0 if demand <= 0 else served / demand

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what `ctl plan -o json` prints)."""
        return {
            "planner": self.planner,
            "status": self.status,
            "objective": round(self.objective, 6),
            "cost_per_hour": round(self.cost_per_hour, 6),
            "solve_time_s": round(self.solve_time_s, 4),
            "mip_gap": self.mip_gap,
            "served_fraction": round(self.served_fraction, 6),
            "gpus_used_by_type": dict(self.gpus_used_by_type),
            "counts": dict(Counter(a.kind.value for a in self.actions)),
            "coverage": {
                m: {
                    "demand_rps": c.demand_rps,
                    "capacity_rps": round(c.capacity_rps, 6),
                    "served_rps": round(c.served_rps, 6),
                    "replicas": c.replicas,
                    "distinct_nodes": c.distinct_nodes,
                    "min_replicas": c.min_replicas,
                }
                for m, c in sorted(self.coverage.items())
            },
            "notes": list(self.notes),
            "actions": [
                {
                    "kind": a.kind.value,
                    "node_id": a.node_id,
                    "model": a.model,
                    "tp": a.tp,
                    "gpu_type": a.gpu_type,
                    "gpu_indices": list(a.gpu_indices),
                    "replica_id": a.replica_id,
                }
                for a in self.actions
            ],
        }


def replica_gpu_type(node: NodeInfo, rep: RunningReplica) -> str | None:
    """The GPU type a running replica uses, or None when its GPUs are of mixed types."""
    types = {node.gpu(i).type for i in rep.gpu_indices}
    return types.pop() if len(types) == 1 else None


def keepable(snapshot: Snapshot, node: NodeInfo | None, rep: RunningReplica) -> bool:
    """Whether a running replica may stay: node present and not draining, model still in the catalog,
    GPU type allowed and memory sufficient. Others are always stopped."""
    model = snapshot.model(rep.model)
    if node is None or node.draining or model is None:
        return False
    gtype = replica_gpu_type(node, rep)
    if gtype is None or not gpu_type_allowed(model, gtype) or not tenant_allowed(model, node.tenant):
        return False
    mem = min(node.gpu(i).memory_gib for i in rep.gpu_indices)
    return rep.tp * mem >= model.memory_gib


def available_gpus(snapshot: Snapshot, node: NodeInfo) -> dict[str, list[int]]:
    """GPU indices per type the planner may use on `node`: free ones plus those of running replicas."""
    idx = set(node.free_gpu_indices)
    for rep in snapshot.current:
        if rep.node_id == node.node_id:
            idx.update(rep.gpu_indices)
    by_type: dict[str, list[int]] = defaultdict(list)
    for gpu in sorted(node.gpus, key=lambda g: g.index):
        if gpu.index in idx:
            by_type[gpu.type].append(gpu.index)
    return dict(by_type)


def build_plan(
    snapshot: Snapshot,
    now: float,
    placement: Placement,
    *,
    planner: str,
    status: str,
    solve_time_s: float,
    notes: Iterable[str] = (),
    solver_objective: float | None = None,
    mip_gap: float | None = None,
) -> Plan:
    """Diff `placement` against the running replicas, bind GPUs, and score the plan.

    Running replicas that match a desired (model, TP, GPU type) on their node are kept (lowest
    GPU index first); the rest stop. New replicas take the lowest free indices, largest TP first,
    so TP groups land on contiguous GPUs where possible. Raises PlanningError when a placement
    does not fit a node (planners guarantee it does).
    """
    nodes = {n.node_id: n for n in snapshot.nodes}
    running: dict[str, list[RunningReplica]] = defaultdict(list)
    for rep in snapshot.current:
        running[rep.node_id].append(rep)
    actions: list[Action] = []
    for node_id in sorted(set(running) | {k for k, v in placement.items() if any(v.values())}):
        node = nodes.get(node_id)
        want = Counter({k: v for k, v in placement.get(node_id, {}).items() if v > 0})
        if node is None:
            if want:
                raise PlanningError(f"placement names unknown node {node_id!r}")
            actions.extend(_stop(rep, "") for rep in running[node_id])
            continue
        actions.extend(_diff_node(snapshot, node, running[node_id], want))
    plan = _score(snapshot, now, actions, planner=planner, status=status, solve_time_s=solve_time_s, notes=notes)
    return replace(plan, solver_objective=solver_objective, mip_gap=mip_gap)


def _stop(rep: RunningReplica, gpu_type: str) -> Action:
    return Action(ActionKind.STOP, rep.node_id, rep.model, rep.tp, gpu_type, rep.gpu_indices, rep.replica_id)


def _diff_node(
    snapshot: Snapshot, node: NodeInfo, reps: list[RunningReplica], want: Counter[ReplicaKey]
) -> list[Action]:
    out: list[Action] = []
    free = {t: set(ix) for t, ix in available_gpus(snapshot, node).items()}
    for rep in sorted(reps, key=lambda r: (min(r.gpu_indices), r.model)):
        gtype = replica_gpu_type(node, rep) or ""
        key = (rep.model, rep.tp, gtype)
        if want[key] > 0 and keepable(snapshot, node, rep):
            want[key] -= 1
            free[gtype].difference_update(rep.gpu_indices)
            out.append(Action(ActionKind.KEEP, node.node_id, rep.model, rep.tp, gtype, rep.gpu_indices, rep.replica_id))
        else:
            out.append(_stop(rep, gtype))
    for (model, tp, gtype), count in sorted(want.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])):
        for _ in range(count):
            pool = sorted(free.get(gtype, ()))
            if len(pool) < tp:
                raise PlanningError(f"{node.node_id}: no {tp} free {gtype} GPUs left for {model}")
            take = tuple(pool[:tp])
            free[gtype].difference_update(take)
            out.append(Action(ActionKind.START, node.node_id, model, tp, gtype, take))
    return out


def _score(
    snapshot: Snapshot,
    now: float,
    actions: list[Action],
    *,
    planner: str,
    status: str,
    solve_time_s: float,
    notes: Iterable[str],
) -> Plan:
    nodes = {n.node_id: n for n in snapshot.nodes}
    table = ThroughputTable(snapshot)
    cost = 0.0
    gpus_used: Counter[str] = Counter()
    capacity: defaultdict[str, float] = defaultdict(float)
    replicas: Counter[str] = Counter()
    hosts: defaultdict[str, set[str]] = defaultdict(set)
    for a in actions:
        if a.kind is ActionKind.STOP:
            continue
        cost += snapshot.gpu_types[a.gpu_type].price_per_hour * a.tp
        gpus_used[a.gpu_type] += a.tp
        model = snapshot.model(a.model)
        if model is not None and snapshot.node_accepts_new(nodes[a.node_id], now):
            capacity[a.model] += table.rps(model, a.gpu_type, a.tp)
            replicas[a.model] += 1
            hosts[a.model].add(a.node_id)
    coverage = {
        m.name: ModelCoverage(
            demand_rps=snapshot.demand.get(m.name, 0.0),
            capacity_rps=capacity[m.name],
            replicas=replicas[m.name],
            distinct_nodes=len(hosts[m.name]),
            min_replicas=m.min_replicas,
        )
        for m in snapshot.models
    }
    w = snapshot.weights
    churn = sum(1 for a in actions if a.kind is not ActionKind.KEEP)
    unmet = sum(c.demand_rps - c.served_rps for c in coverage.values())
    short = sum(c.min_replicas_short for c in coverage.values())
    objective = cost + w.unmet_demand_penalty * unmet + w.churn_penalty * churn + w.min_replicas_penalty * short
    all_notes = list(notes)
    for name, c in sorted(coverage.items()):
        if c.min_replicas_short:
            all_notes.append(
                f"{name}: min_replicas={c.min_replicas} not met, only {c.distinct_nodes} distinct node(s) host it"
            )
    if snapshot.budget_per_hour > 0 and cost > snapshot.budget_per_hour * (1 + 1e-9):
        all_notes.append(f"cost {cost:.2f}/h exceeds budget {snapshot.budget_per_hour:.2f}/h")
    return Plan(
        planner=planner,
        actions=tuple(actions),
        cost_per_hour=cost,
        coverage=coverage,
        gpus_used_by_type=dict(sorted(gpus_used.items())),
        objective=objective,
        status=status,
        solve_time_s=solve_time_s,
        notes=tuple(all_notes),
    )


def fits(snapshot: Snapshot, node: NodeInfo, model_name: str, gpu_type: str, tp: int) -> bool:
    """Whether a replica of `model_name` at `tp` on `gpu_type` GPUs of `node` is allowed and fits memory."""
    model = snapshot.model(model_name)
    if model is None or not gpu_type_allowed(model, gpu_type) or not tenant_allowed(model, node.tenant):
        return False
    mems = [g.memory_gib for g in node.gpus if g.type == gpu_type]
    return bool(mems) and tp in tp_options(model, min(mems))
