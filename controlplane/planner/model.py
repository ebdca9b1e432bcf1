"""`compute_plan`: the MILP placement planner. The formulation is in milp.py; this module decides
what the MILP's units are and turns their counts back into nodes and GPUs.

Hard constraints: GPU capacity per node, memory per GPU ((weights+kv)/tp <= GPU memory),
allowed GPU types, no new replica on a node that drains or leaves within the horizon, budget,
max_replicas. Demand and min_replicas (spread over distinct nodes) are soft with big penalties,
so every snapshot gets a plan and shortfalls come back as notes. Running replicas on a draining
node, of a removed model, or that no longer fit are stopped; those on a node leaving within the
horizon keep running until it leaves but count for nothing, so replacements start now (make
before break). min/max_replicas count replicas on nodes that stay.

Units. A node with running replicas is a *single* unit while there are at most
`max_single_nodes` of them: exact per-node capacity, keep/stop per replica. Every other node
that accepts new replicas contributes its GPUs to a *class* unit per (GPU type, memory): a list of
bins (node, free GPUs C_b), with replica counts per class instead of per node.

Aggregating free nodes into classes is exact. (1) Relaxation: TP degrees are powers of two, so
for every degree t the replicas of degree >= t occupy a multiple of t GPUs on each node, at most
t*floor(C_b/t); summing over the bins gives the packing row
``sum_{t'>=t} t'*x[t'] <= sum_b t*floor(C_b/t)``, which every per-node plan satisfies; spread
maps to z[m,u] = nodes of u hosting m (<= replicas, <= nodes). So the class model's optimum is a
lower bound. (2) Realisation: placing replicas largest TP first, each on *any* bin with room,
never fails while those rows hold: when a replica of degree t is placed every bin's load is a
multiple of t, so a bin has room iff load <= t*floor(C_b/t) - t, and the row for t guarantees
such a bin exists (sizes that divide each other pack perfectly; bins may differ in size). The
per-bin counts have the same objective, so the bound is attained and the plan is optimal. The
one thing packing does not guarantee is min-replica spread (z distinct nodes): binding prefers
bins on nodes without the model and checks; a class that still falls short has the nodes
involved split into single units and the model is re-solved. Every plan returned is feasible
and optimal (within the MIP gap) for the model solved.

Beyond `max_single_nodes` running nodes (steady state of a large pool), running nodes join the
classes too: each running replica is a keep variable and, when stopped, its GPUs become a bin of
their own. That is a restriction, not a relaxation: within one plan a stopped replica's GPUs are
not merged with the node's other free GPUs into a larger block (the next plan sees them merged).
Why classes rather than groups of identical nodes: nodes of one GPU type with different free
counts are otherwise separate groups with identical costs, and that symmetry is what makes
branch-and-bound slow.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import structlog

from controlplane.planner.diff import (
    Placement,
    Plan,
    PlanningError,
    ReplicaKey,
    available_gpus,
    build_plan,
    keepable,
    replica_gpu_type,
)
from controlplane.planner.milp import KeepGroup, Solution, Unit, solve_units
from controlplane.planner.obtainable import AcquiredJob, ObtainableSpec, bind_obtainable
from controlplane.planner.snapshot import NodeInfo, Snapshot

log = structlog.get_logger(__name__)

#: Relative MIP gap at which the solver stops: 1% of the objective. Demand covering with integer
#: replicas has a weak LP bound; proving the last fraction of a percent costs minutes at 1,000 nodes.
DEFAULT_MIP_GAP = 0.01

#: Up to this many nodes with running replicas are modelled one by one (exact); more join classes.
DEFAULT_MAX_SINGLE_NODES = 64

#: How many times nodes are split out of classes for min-replica spread before all become single.
_MAX_REGROUP_ROUNDS = 3


@dataclass
class _Frame:
    """What stays fixed across regroup rounds: forced keeps/stops and the eligible nodes."""

    fixed: dict[str, Counter[ReplicaKey]]
    fixed_cost: float
    forced_stops: int
    eligible: list[NodeInfo]
    running: dict[str, Counter[ReplicaKey]]
    notes: list[str]


def compute_plan(
    snapshot: Snapshot,
    now: float,
    *,
    time_limit_s: float = 10.0,
    mip_gap: float = DEFAULT_MIP_GAP,
    group_identical_nodes: bool = True,
    max_single_nodes: int = DEFAULT_MAX_SINGLE_NODES,
) -> Plan:
    """Compute the cost-, demand- and churn-optimal placement for `snapshot` at unix time `now`.

    Pure: reads nothing but its arguments. `time_limit_s` bounds the whole call (model building
    included, roughly); when the solver stops at the limit the best plan found is returned with
    status ``feasible``; with no plan found at all every keepable replica is kept (status
    ``no_solution``). `mip_gap` is the relative optimality gap accepted (0 = prove optimal).
    `group_identical_nodes=False` models every node singly (slow; for tests of the aggregation).
    """
    return _compute(snapshot, now, time_limit_s=time_limit_s, mip_gap=mip_gap,
                    group_identical_nodes=group_identical_nodes, max_single_nodes=max_single_nodes)[0]


@dataclass(frozen=True)
class PlanWithAcquisitions:
    """`plan_with_obtainable`'s answer: the pool's plan and the jobs to acquire, from one MILP."""

    plan: Plan                       # placement on the pool's own nodes (acquired replicas not in it)
    jobs: tuple[AcquiredJob, ...]    # what to acquire, with the replicas the MILP put on each
    unmet_rps: dict[str, float]      # demand left unserved with the acquisitions (solver's unmet)
    objective: float | None = None   # the joint MILP's objective (pool + acquisitions); None: no solution


def plan_with_obtainable(
    snapshot: Snapshot,
    now: float,
    obtainable: ObtainableSpec,
    *,
    time_limit_s: float = 10.0,
    mip_gap: float = DEFAULT_MIP_GAP,
    max_single_nodes: int = DEFAULT_MAX_SINGLE_NODES,
) -> PlanWithAcquisitions:
    """`compute_plan` with capacity that could be acquired next to the pool's (obtainable.py):
    acquiring and placing are one decision, under the obtainable budget and job limits."""
    plan, solution = _compute(snapshot, now, time_limit_s=time_limit_s, mip_gap=mip_gap, group_identical_nodes=True,
                              max_single_nodes=max_single_nodes, obtainable=obtainable)
    if solution is None:
        unmet = {m: c.demand_rps - c.served_rps for m, c in plan.coverage.items() if c.demand_rps > c.served_rps}
        return PlanWithAcquisitions(plan, (), unmet)
    jobs = tuple(bind_obtainable(obtainable, solution.obtained, solution.jobs))
    # the solver's objective includes the acquisitions; the plan's own covers the pool's nodes only
    return PlanWithAcquisitions(replace(plan, solver_objective=None), jobs,
                                {m: u for m, u in solution.unmet.items() if u > 1e-9}, solution.objective)


def _compute(snapshot: Snapshot, now: float, *, time_limit_s: float, mip_gap: float, group_identical_nodes: bool,
             max_single_nodes: int, obtainable: ObtainableSpec | None = None) -> tuple[Plan, Solution | None]:
    started = time.perf_counter()
    deadline = started + time_limit_s
    frame = _frame(snapshot, now)
    split: set[str] = set() if group_identical_nodes else {n.node_id for n in frame.eligible}
    if len(frame.running) <= max_single_nodes:
        split.update(frame.running)
    notes = list(frame.notes)
    w = snapshot.weights
    budget = max(0.0, snapshot.budget_per_hour - frame.fixed_cost) if snapshot.budget_per_hour > 0 else None
    if budget == 0.0:
        notes.append("replicas on leaving nodes use the whole budget; nothing new can start")
    for round_no in range(_MAX_REGROUP_ROUNDS + 2):
        units = _units(snapshot, frame, split)
        solution = solve_units(
            snapshot,
            units,
            constant=frame.fixed_cost + w.churn_penalty * frame.forced_stops,
            budget=budget,
            time_limit_s=max(0.05, deadline - time.perf_counter()),
            mip_gap=mip_gap,
            obtainable=obtainable,
        )
        if solution is None:
            placement = _merge(frame.fixed, frame.running)
            notes.append("solver found no solution within the time limit; keeping every keepable replica")
            return _finish(snapshot, now, placement, "no_solution", started, notes, None), None
        placement, failed = _bind(snapshot, units, solution)
        if not failed:
            plan = _finish(snapshot, now, _merge(frame.fixed, placement), solution.status, started, notes, solution)
            return plan, solution
        log.info("planner.regroup", round=round_no, split_nodes=len(failed))
        split.update(failed if round_no < _MAX_REGROUP_ROUNDS else {n.node_id for n in frame.eligible})
    raise PlanningError("unreachable: the last round models every node singly")  # pragma: no cover


def _finish(
    snapshot: Snapshot,
    now: float,
    placement: Placement,
    status: str,
    started: float,
    notes: list[str],
    solution: Solution | None,
) -> Plan:
    plan = build_plan(
        snapshot,
        now,
        placement,
        planner="milp",
        status=status,
        solve_time_s=time.perf_counter() - started,
        notes=notes,
        solver_objective=solution.objective if solution else None,
        mip_gap=solution.gap if solution else None,
    )
    log.debug("planner.done", status=status, objective=plan.objective, solve_time_s=plan.solve_time_s)
    return plan


def _frame(snapshot: Snapshot, now: float) -> _Frame:
    nodes = {n.node_id: n for n in snapshot.nodes}
    fixed: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)
    running: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)
    fixed_cost = 0.0
    forced_stops = 0
    notes: list[str] = []
    for rep in snapshot.current:
        node = nodes.get(rep.node_id)
        if node is None or not keepable(snapshot, node, rep):
            forced_stops += 1
            continue
        gtype = replica_gpu_type(node, rep) or ""
        key = (rep.model, rep.tp, gtype)
        if snapshot.node_accepts_new(node, now):
            running[node.node_id][key] += 1
        else:
            # Leaving within the horizon: it keeps serving until its job ends, but counts for
            # nothing, so replacements are planned now (make before break).
            fixed[node.node_id][key] += 1
            fixed_cost += snapshot.gpu_types[gtype].price_per_hour * rep.tp
    if forced_stops:
        notes.append(
            f"{forced_stops} running replica(s) must stop (node gone or draining, model removed, or no longer fits)"
        )
    eligible = [n for n in snapshot.nodes if snapshot.node_accepts_new(n, now)]
    return _Frame(dict(fixed), fixed_cost, forced_stops, eligible, dict(running), notes)


def _units(snapshot: Snapshot, frame: _Frame, split: set[str]) -> list[Unit]:
    units: list[Unit] = []
    classes: dict[tuple[str, float, str | None], Unit] = {}
    # Classes mix tenants' nodes unless some model may be served by some tenants only (servers):
    # then a class is one tenant's, so the MILP knows which models each class may host.
    by_tenant = any(m.servers for m in snapshot.models)
    for node in frame.eligible:
        avail = {t: len(ix) for t, ix in available_gpus(snapshot, node).items()}
        if not avail:
            continue  # nothing free and nothing of ours running: nothing to decide here
        memory = {t: min(g.memory_gib for g in node.gpus if g.type == t) for t in avail}
        running = frame.running.get(node.node_id, Counter())
        groups = [KeepGroup(node.node_id, key, c) for key, c in sorted(running.items())]
        if node.node_id in split:
            bins = {t: [(node.node_id, c)] for t, c in avail.items()}
            units.append(Unit(node.node_id, True, memory, bins, groups, tenant=node.tenant))
            continue
        tenant = node.tenant if by_tenant else None
        for t, c in avail.items():
            unit = classes.get((t, memory[t], tenant))
            if unit is None:
                name = f"class:{t}/{memory[t]:g}GiB" + (f"/{tenant}" if tenant is not None else "")
                unit = classes[(t, memory[t], tenant)] = Unit(name, False, {t: memory[t]}, {t: []}, tenant=tenant)
            held = sum(g.key[1] * g.count for g in groups if g.key[2] == t)
            unit.bins[t].append((node.node_id, c - held))
            unit.keep.extend(g for g in groups if g.key[2] == t)
    units.extend(classes[k] for k in sorted(classes, key=lambda k: (k[0], k[1], k[2] or "")))
    return units


def _bind(snapshot: Snapshot, units: list[Unit], sol: Solution) -> tuple[dict[str, Counter[ReplicaKey]], set[str]]:
    """Turn per-unit counts into per-node counts.

    Returns the placement and the nodes to model singly because a model ended up on fewer
    distinct nodes than the solver counted on (capped at its min_replicas).
    """
    starts: dict[int, Counter[ReplicaKey]] = defaultdict(Counter)
    for (ui, key), n in sol.starts.items():
        starts[ui][key] += n
    promised: Counter[str] = Counter()
    for (_, model_name), z in sol.spread.items():
        promised[model_name] += z
    placement: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)
    hosts: dict[str, set[str]] = defaultdict(set)
    for ui, unit in enumerate(units):
        for gi, g in enumerate(unit.keep):
            kept = sol.keeps.get((ui, gi), 0)
            if kept:
                placement[g.node_id][g.key] += kept
                hosts[g.key[0]].add(g.node_id)
        if unit.single:
            nid = unit.node_ids[0]
            placement[nid].update(starts[ui])
            for model_name, _, _ in +starts[ui]:
                hosts[model_name].add(nid)
    for ui, unit in enumerate(units):
        if not unit.single:
            _pack_class(unit, ui, starts[ui], sol, promised, hosts, placement)
    failed: set[str] = set()
    for model in snapshot.models:
        need = min(model.min_replicas, promised[model.name])
        if need >= 2 and len(hosts[model.name]) < need:
            for ui, unit in enumerate(units):
                if not unit.single and any(key[0] == model.name for key in +starts[ui]):
                    failed.update(unit.node_ids)
    return dict(placement), failed


def _pack_class(
    unit: Unit,
    ui: int,
    want: Counter[ReplicaKey],
    sol: Solution,
    promised: Counter[str],
    hosts: dict[str, set[str]],
    placement: dict[str, Counter[ReplicaKey]],
) -> None:
    """Largest TP first onto any bin with room (never fails, see module docstring); while a model is
    on fewer nodes than promised, prefer a bin on a node that does not host it yet."""
    bins: dict[str, list[tuple[str, int]]] = {t: list(b) for t, b in unit.bins.items()}
    for gi, g in enumerate(unit.keep):  # GPUs of stopped replicas: a bin of their own each
        bins[g.key[2]].extend([(g.node_id, g.key[1])] * (g.count - sol.keeps.get((ui, gi), 0)))
    load: dict[tuple[str, int], int] = defaultdict(int)
    items = sorted(want.items(), key=lambda kv: (-kv[0][1], -promised[kv[0][0]], kv[0]))
    for (model, tp, gtype), n in items:
        for _ in range(n):
            room = [(i, nid) for i, (nid, cap) in enumerate(bins[gtype]) if load[(gtype, i)] + tp <= cap]
            if not room:
                raise PlanningError(f"packing rows violated in {unit.unit_id}")  # pragma: no cover
            pick = room[0]
            if len(hosts[model]) < promised[model]:
                pick = next((r for r in room if r[1] not in hosts[model]), pick)
            load[(gtype, pick[0])] += tp
            hosts[model].add(pick[1])
            placement[pick[1]][(model, tp, gtype)] += 1


def _merge(*parts: dict[str, Counter[ReplicaKey]]) -> Placement:
    merged: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)
    for part in parts:
        for node_id, c in part.items():
            merged[node_id].update(c)
    return dict(merged)
