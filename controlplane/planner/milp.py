"""The MILP itself: units of GPUs in, integer replica counts out (PuLP model, HiGHS; CBC fallback).

`model.py` decides what a unit is and turns counts back into nodes; this module only builds and
solves. Variables, per unit u (one node, or a class of nodes' GPUs, see model.py) and GPU type:

    x[u,m,t]   integer  new replicas of model m at tensor parallelism t
    k[u,g]     integer  running replicas of keep group g (same node, model, TP, type) that stay, 0..count
    z[u,m]     integer  distinct nodes of u hosting m (only models with min_replicas >= 2):
                        z <= sum x[u,m,.] + sum over nodes n keeping m of y[n,m] (0/1, <= sum k of n)
    unmet[m]   >= 0     requests/s not served:  unmet + sum rps(m,type,t) * (x + k) >= demand
    short[m]   >= 0     distinct nodes missing below min_replicas

    minimise  sum price*t*(x + k) + unmet_penalty*unmet + churn_penalty*(x + count - k)
              + min_replicas_penalty*short + constants (forced stops, replicas on leaving nodes)

Packing rows per unit and GPU type, t over the TP degrees of its x (model.py argues exactness):
    single node:  sum t'*x + sum tp_g*k_g <= C                  (one row; C counts running GPUs)
    class:        sum_{t'>=t} t'*x <= sum_bins t*floor(C_b/t) + sum_g t*floor(tp_g/t)*(count_g - k_g)
In a class, the GPUs of a stopped replica form a bin of their own (reusable at its size or less).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pulp
import structlog

from controlplane.planner.diff import ReplicaKey
from controlplane.planner.obtainable import ObtainableSpec, add_obtainable, read_obtained
from controlplane.planner.snapshot import Snapshot, ThroughputTable, gpu_type_allowed, tenant_allowed, tp_options

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class KeepGroup:
    """`count` running replicas of one (model, tp, type) on one node that the plan may keep."""

    node_id: str
    key: ReplicaKey
    count: int


@dataclass
class Unit:
    """GPUs the MILP decides for as one: a single node (exact capacity) or a class of nodes.

    `bins[type]` is (node_id, GPUs) per node: all usable GPUs of a single node (running ones
    included), or the GPUs nothing keepable runs on for a class.
    """

    unit_id: str
    single: bool
    memory: dict[str, float]
    bins: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    keep: list[KeepGroup] = field(default_factory=list)
    tenant: str | None = None     # whose nodes (ModelSpec.servers); None: several tenants' nodes

    @property
    def node_ids(self) -> list[str]:
        nodes = {nid for bins in self.bins.values() for nid, _ in bins}
        nodes.update(g.node_id for g in self.keep)
        return sorted(nodes)


@dataclass
class Solution:
    """What the solver decided, in unit terms."""

    status: str  # optimal (within the gap) | feasible (limit hit)
    objective: float
    gap: float | None
    starts: dict[tuple[int, ReplicaKey], int]  # (unit index, key) -> new replicas
    keeps: dict[tuple[int, int], int]  # (unit index, keep group index) -> replicas kept
    spread: dict[tuple[int, str], int]  # (unit index, model) -> distinct nodes promised
    # with obtainable capacity (obtainable.py): (class index, key) -> replicas, class index -> jobs
    obtained: dict[tuple[int, ReplicaKey], int] = field(default_factory=dict)
    jobs: dict[int, int] = field(default_factory=dict)
    unmet: dict[str, float] = field(default_factory=dict)  # model -> requests/s left unserved


class _Builder:
    """Accumulates variables, objective terms and a churn-free warm start."""

    def __init__(self) -> None:
        self.prob = pulp.LpProblem("modelpool_plan", pulp.LpMinimize)
        self.objective: dict[pulp.LpVariable, float] = defaultdict(float)  # a variable may get several terms
        self.start: dict[pulp.LpVariable, float] = {}
        self._n = 0

    def var(self, low: float, up: float | None, integer: bool, warm: float = 0.0) -> pulp.LpVariable:
        self._n += 1
        cat = pulp.LpInteger if integer else pulp.LpContinuous
        v = pulp.LpVariable(f"v{self._n}", lowBound=low, upBound=up, cat=cat)
        self.start[v] = warm
        return v


def solve_units(
    snapshot: Snapshot, units: list[Unit], *, constant: float, budget: float | None, time_limit_s: float,
    mip_gap: float, obtainable: ObtainableSpec | None = None,
) -> Solution | None:
    """Build and solve the MILP; None when the solver found no solution in time.

    ``obtainable``: capacity that could be acquired, decided in the same model (obtainable.py)."""
    w = snapshot.weights
    table = ThroughputTable(snapshot)
    b = _Builder()
    x: dict[tuple[int, ReplicaKey], pulp.LpVariable] = {}
    k: dict[tuple[int, int], pulp.LpVariable] = {}
    rps_terms: dict[str, list[tuple[pulp.LpVariable, float]]] = defaultdict(list)
    unit_terms: dict[tuple[int, str], list[pulp.LpVariable]] = defaultdict(list)
    model_terms: dict[str, list[pulp.LpVariable]] = defaultdict(list)
    budget_terms: list[tuple[pulp.LpVariable, float]] = []
    kept_rps: dict[str, float] = defaultdict(float)
    kept_nodes: dict[tuple[int, str], set[str]] = defaultdict(set)
    # keep variables per (unit, model) and node: a node counts once towards spread however many
    # replicas of the model it keeps
    kept_terms: dict[tuple[int, str], dict[str, list[pulp.LpVariable]]] = defaultdict(lambda: defaultdict(list))
    churn_constant = 0.0
    models = {m.name: m for m in snapshot.models}

    for ui, unit in enumerate(units):
        for gi, g in enumerate(unit.keep):
            model_name, tp, gtype = g.key
            price = snapshot.gpu_types[gtype].price_per_hour
            kv = b.var(0, g.count, True, warm=g.count)
            k[(ui, gi)] = kv
            b.objective[kv] += price * tp - w.churn_penalty  # each stop (count - k) costs churn
            churn_constant += w.churn_penalty * g.count
            budget_terms.append((kv, price * tp))
            rps = table.rps(models[model_name], gtype, tp)
            rps_terms[model_name].append((kv, rps))
            kept_rps[model_name] += rps * g.count
            kept_terms[(ui, model_name)][g.node_id].append(kv)
            model_terms[model_name].append(kv)
            kept_nodes[(ui, model_name)].add(g.node_id)
        for gtype, bins in sorted(unit.bins.items()):
            price = snapshot.gpu_types[gtype].price_per_hour
            groups = [(gi, g) for gi, g in enumerate(unit.keep) if g.key[2] == gtype]
            # Largest block a new replica could use: a bin, or (in a class) a stopped replica's GPUs.
            biggest = max([c for _, c in bins] + ([] if unit.single else [g.key[1] for _, g in groups]))
            new_vars: list[tuple[int, pulp.LpVariable]] = []
            for model in snapshot.models:
                if not gpu_type_allowed(model, gtype) or not tenant_allowed(model, unit.tenant):
                    continue
                for tp in tp_options(model, unit.memory[gtype]):
                    if tp > biggest:
                        continue
                    upper = sum(c // tp for _, c in bins)
                    if not unit.single:
                        upper += sum(g.count * (g.key[1] // tp) for _, g in groups)
                    if model.max_replicas:
                        upper = min(upper, model.max_replicas)
                    xv = b.var(0, upper, True)
                    x[(ui, (model.name, tp, gtype))] = xv
                    new_vars.append((tp, xv))
                    b.objective[xv] += price * tp + w.churn_penalty
                    budget_terms.append((xv, price * tp))
                    rps_terms[model.name].append((xv, table.rps(model, gtype, tp)))
                    unit_terms[(ui, model.name)].append(xv)
                    model_terms[model.name].append(xv)
            _packing_rows(b.prob, unit, bins, groups, new_vars, k, ui)

    cols = (add_obtainable(b.prob, b.objective, b.start, b.var, snapshot, table, obtainable, rps_terms, model_terms,
                           budget_terms) if obtainable is not None else None)
    unmet_vars: dict[str, pulp.LpVariable] = {}
    spread = _demand_and_replica_rows(snapshot, b, units, rps_terms, unit_terms, kept_terms, model_terms, kept_rps,
                                      kept_nodes, unmet_vars)
    if budget is not None and budget_terms:
        b.prob += pulp.LpAffineExpression(budget_terms) <= budget
    total_constant = constant + churn_constant
    b.prob += pulp.LpAffineExpression(list(b.objective.items()), constant=total_constant)
    if not b.start:  # no variables at all (no models): nothing to decide
        return Solution("optimal", total_constant, 0.0, {}, {}, {})
    b.prob.solve(_solver(time_limit_s, mip_gap, b.start))
    if b.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None
    log.debug("planner.solved", variables=len(b.start), units=len(units), status=b.prob.sol_status)
    obtained, jobs = read_obtained(cols) if cols is not None else ({}, {})
    return Solution(
        status="optimal" if b.prob.sol_status == pulp.LpSolutionOptimal else "feasible",
        objective=float(pulp.value(b.prob.objective)),
        gap=_achieved_gap(b.prob),
        starts={key: round(v.varValue or 0.0) for key, v in x.items() if (v.varValue or 0.0) > 0.5},
        keeps={key: round(v.varValue or 0.0) for key, v in k.items()},
        spread={key: round(v.varValue or 0.0) for key, v in spread.items() if (v.varValue or 0.0) > 0.5},
        obtained=obtained, jobs=jobs, unmet={m: float(v.varValue or 0.0) for m, v in unmet_vars.items()},
    )


def _packing_rows(
    prob: pulp.LpProblem,
    unit: Unit,
    bins: list[tuple[str, int]],
    groups: list[tuple[int, KeepGroup]],
    new_vars: list[tuple[int, pulp.LpVariable]],
    k: dict[tuple[int, int], pulp.LpVariable],
    ui: int,
) -> None:
    if unit.single:  # one bin: the GPU count is the whole condition (indices need not be contiguous)
        terms = [(v, tp) for tp, v in new_vars] + [(k[(ui, gi)], g.key[1]) for gi, g in groups]
        if terms:
            prob += pulp.LpAffineExpression(terms) <= sum(c for _, c in bins)
        return
    for t in sorted({tp for tp, _ in new_vars}):
        terms = [(v, tp) for tp, v in new_vars if tp >= t]
        rhs = sum(t * (c // t) for _, c in bins)
        for gi, g in groups:
            block = t * (g.key[1] // t)
            if block:
                terms.append((k[(ui, gi)], block))
                rhs += block * g.count
        prob += pulp.LpAffineExpression(terms) <= rhs


def _demand_and_replica_rows(
    snapshot: Snapshot,
    b: _Builder,
    units: list[Unit],
    rps_terms: dict[str, list[tuple[pulp.LpVariable, float]]],
    unit_terms: dict[tuple[int, str], list[pulp.LpVariable]],
    kept_terms: dict[tuple[int, str], dict[str, list[pulp.LpVariable]]],
    model_terms: dict[str, list[pulp.LpVariable]],
    kept_rps: dict[str, float],
    kept_nodes: dict[tuple[int, str], set[str]],
    unmet_out: dict[str, pulp.LpVariable] | None = None,
) -> dict[tuple[int, str], pulp.LpVariable]:
    w = snapshot.weights
    spread: dict[tuple[int, str], pulp.LpVariable] = {}
    for model in snapshot.models:
        demand = snapshot.demand.get(model.name, 0.0)
        if demand > 0:
            # unmet rather than served keeps the objective on the scale of costs: the relative gap means something
            unmet = b.var(0, demand, False, warm=max(0.0, demand - kept_rps[model.name]))
            b.prob += pulp.LpAffineExpression(rps_terms[model.name]) + unmet >= demand
            b.objective[unmet] += w.unmet_demand_penalty
            if unmet_out is not None:
                unmet_out[model.name] = unmet
        if model.max_replicas and model_terms[model.name]:
            b.prob += pulp.lpSum(model_terms[model.name]) <= model.max_replicas
        if model.min_replicas == 0:
            continue
        hosting = set().union(*(nodes for (_, m), nodes in kept_nodes.items() if m == model.name))
        short = b.var(0, model.min_replicas, False, warm=max(0, model.min_replicas - len(hosting)))
        b.objective[short] += w.min_replicas_penalty
        if model.min_replicas == 1:
            b.prob += pulp.lpSum(model_terms[model.name]) + short >= 1
            continue
        present: list[pulp.LpVariable] = []
        for ui, unit in enumerate(units):
            new = unit_terms.get((ui, model.name), [])
            kept = kept_terms.get((ui, model.name), {})
            if not new and not kept:
                continue
            hosts: list[pulp.LpVariable] = []
            for kvs in kept.values():
                if len(kvs) == 1 and kvs[0].upBound == 1:
                    hosts.append(kvs[0])  # already a 0/1 "this node keeps one" indicator
                    continue
                yv = b.var(0, 1, True, warm=1)
                b.prob += yv <= pulp.lpSum(kvs)
                hosts.append(yv)
            zv = b.var(0, len(unit.node_ids), True, warm=len(kept))
            b.prob += zv <= pulp.lpSum(new) + pulp.lpSum(hosts)
            spread[(ui, model.name)] = zv
            present.append(zv)
        b.prob += pulp.lpSum(present) + short >= model.min_replicas
    return spread


class _WarmHiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
    """PuLP's HiGHS interface plus a starting solution (PuLP offers no warm start for HiGHS)."""

    def __init__(self, start: dict[pulp.LpVariable, float], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._start = start

    def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:  # PuLP hook name
        # highspy >= 1.16 prints a banner from C on stdout when a Highs object is created, before
        # PuLP can turn output off; `ctl plan -o json` must print JSON only.
        with _c_stdout_to_stderr():
            super().createAndConfigureSolver(lp)

    def callSolver(self, lp: pulp.LpProblem) -> None:  # PuLP hook name
        import highspy

        values = [0.0] * lp.solverModel.getNumCol()
        for v, value in self._start.items():
            values[v.index] = value
        sol = highspy.HighsSolution()
        sol.col_value = values
        lp.solverModel.setSolution(sol)
        lp.solverModel.run()


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code writes to file descriptor 1 to descriptor 2 for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solver(time_limit_s: float, mip_gap: float, start: dict[pulp.LpVariable, float]) -> pulp.LpSolver:
    if pulp.HiGHS().available():
        return _WarmHiGHS(start, msg=False, timeLimit=time_limit_s, gapRel=mip_gap)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, math.ceil(time_limit_s)), gapRel=mip_gap)


def _achieved_gap(prob: pulp.LpProblem) -> float | None:
    """The relative MIP gap HiGHS reports (None with CBC)."""
    model = getattr(prob, "solverModel", None)
    if model is None:
        return None
    try:
        return float(model.getInfo().mip_gap)
    except (AttributeError, TypeError, ValueError):
        return None
