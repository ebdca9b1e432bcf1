"""The planner core: snapshot parsing, MILP optimality (against brute force), churn, limits, baselines."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from controlplane.planner import (
    ActionKind,
    GpuInfo,
    GpuTypeInfo,
    ModelInfo,
    NodeInfo,
    Plan,
    PlanWeights,
    RunningReplica,
    Snapshot,
    SnapshotError,
    ThroughputProfile,
    ThroughputTable,
    build_plan,
    compute_plan,
    plan_greedy,
    plan_single_best_type,
    tp_options,
)
from controlplane.planner.diff import available_gpus, keepable

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
TYPES = {
    "H100": GpuTypeInfo(price_per_hour=2.5, relative_speed=3.0),
    "A100-40GB": GpuTypeInfo(price_per_hour=1.2, relative_speed=1.6),
    "RTX4090": GpuTypeInfo(price_per_hour=0.4, relative_speed=1.0),
}
MEMORY = {"H100": 80.0, "A100-40GB": 40.0, "RTX4090": 24.0}


def node(node_id: str, gtype: str, count: int, free: tuple[int, ...] | None = None, **kw: object) -> NodeInfo:
    gpus = tuple(GpuInfo(index=i, type=gtype, memory_gib=MEMORY[gtype]) for i in range(count))
    return NodeInfo(node_id=node_id, gpus=gpus, free_gpu_indices=tuple(range(count)) if free is None else free, **kw)  # type: ignore[arg-type]


def check_plan_valid(snap: Snapshot, now: float, plan: Plan) -> None:
    """Hard constraints every planner must hold, checked from the actions alone."""
    nodes = {n.node_id: n for n in snap.nodes}
    held: dict[str, set[int]] = {}
    for rep in snap.current:
        held.setdefault(rep.node_id, set()).update(rep.gpu_indices)
    used: dict[str, set[int]] = {}
    for a in plan.actions:
        if a.kind is ActionKind.STOP:
            continue
        n = nodes[a.node_id]
        assert len(a.gpu_indices) == a.tp
        mine = used.setdefault(a.node_id, set())
        assert not mine & set(a.gpu_indices), f"GPUs used twice on {a.node_id}"
        mine.update(a.gpu_indices)
        assert {n.gpu(i).type for i in a.gpu_indices} == {a.gpu_type}
        model = snap.model(a.model)
        assert model is not None
        if model.allowed_gpu_types:
            assert a.gpu_type in model.allowed_gpu_types
        assert a.tp * min(n.gpu(i).memory_gib for i in a.gpu_indices) >= model.memory_gib
        if a.kind is ActionKind.START:
            assert snap.node_accepts_new(n, now), f"START on {a.node_id}, which drains or leaves"
            assert set(a.gpu_indices) <= set(n.free_gpu_indices) | held.get(a.node_id, set())
    # max_replicas counts replicas on nodes that stay; those on leaving nodes run out their time.
    per_model = Counter(
        a.model for a in plan.actions if a.kind is not ActionKind.STOP and snap.node_accepts_new(nodes[a.node_id], now)
    )
    for m in snap.models:
        if m.max_replicas:
            assert per_model[m.name] <= m.max_replicas
    if snap.budget_per_hour > 0:
        fixed = sum(
            TYPES[a.gpu_type].price_per_hour * a.tp
            for a in plan.actions
            if a.kind is ActionKind.KEEP and not snap.node_accepts_new(nodes[a.node_id], now)
        )
        assert plan.cost_per_hour <= max(snap.budget_per_hour, fixed) + 1e-6


def random_snapshot(rng: random.Random, n_nodes: int, n_models: int, with_current: bool = True) -> Snapshot:
    nodes = []
    for i in range(n_nodes):
        gtype = rng.choice(list(TYPES))
        count = rng.choice((1, 2, 4))
        free = tuple(sorted(rng.sample(range(count), rng.randint(0, count))))
        end = rng.choice((0, 0, int(NOW + 60), int(NOW + 86400)))
        nodes.append(node(f"n{i}", gtype, count, free, end_time_unix=end, draining=rng.random() < 0.1))
    models = []
    for j in range(n_models):
        allowed = tuple(rng.sample(list(TYPES), 2)) if rng.random() < 0.3 else ()
        models.append(
            ModelInfo(
                name=f"m{j}",
                weight_memory_gib=rng.choice((8, 16, 30, 60)),
                kv_memory_gib=rng.choice((0, 4)),
                min_replicas=rng.choice((0, 0, 1, 2)),
                max_replicas=rng.choice((0, 0, 3)),
                allowed_gpu_types=allowed,
                reference_rps=rng.choice((0.5, 1.0, 2.0)),
            )
        )
    current = []
    if with_current:
        for n in nodes:
            busy = [i for i in range(len(n.gpus)) if i not in n.free_gpu_indices]
            if busy and rng.random() < 0.7:
                model = rng.choice(models)
                current.append(
                    RunningReplica(
                        node_id=n.node_id, model=model.name, tp=1, gpu_indices=(busy[0],), replica_id=n.node_id
                    )
                )
    demand = {m.name: rng.choice((0.0, 0.5, 2.0, 6.0)) for m in models}
    return Snapshot(
        nodes=tuple(nodes),
        models=tuple(models),
        gpu_types=TYPES,
        demand=demand,
        budget_per_hour=rng.choice((0.0, 0.0, 5.0)),
        current=tuple(current),
        weights=PlanWeights(unmet_demand_penalty=10.0, churn_penalty=0.3, min_replicas_penalty=100.0),
    )


# ---- snapshot ------------------------------------------------------------------------------------


def test_example_snapshot_loads_and_plans() -> None:
    snap = Snapshot.load(ROOT / "examples" / "snapshot-small.yaml")
    assert len(snap.nodes) == 4 and len(snap.models) == 3
    plan = compute_plan(snap, NOW)
    check_plan_valid(snap, NOW, plan)
    assert plan.status == "optimal"
    assert plan.served_fraction == pytest.approx(1.0)
    assert json.dumps(plan.summary())  # JSON-serialisable


def test_snapshot_json_round_trip(tmp_path: Path) -> None:
    snap = Snapshot.load(ROOT / "examples" / "snapshot-small.yaml")
    path = tmp_path / "snap.json"
    path.write_text(snap.model_dump_json())
    assert Snapshot.load(path) == snap


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["nodes"][0]["gpus"][0].update(memory_gib=-1), "nodes[0].gpus[0].memory_gib"),
        (lambda d: d["nodes"][1]["gpus"][0].update(type="TPU"), "nodes[1].gpus[0].type: GPU type 'TPU'"),
        (lambda d: d["nodes"][2].update(free_gpu_indices=[0, 9]), "GPU index 9 is not one of the node's GPUs"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "nodes[4].node_id: duplicate 'gpu-h100-01'"),
        (lambda d: d["models"][0].update(tensor_parallel_options=[3]), "models[0].tensor_parallel_options"),
        (lambda d: d.update(demand={"x": -1.0}), "demand"),
        (lambda d: d.update(surprise=1), "surprise"),
    ],
)
def test_snapshot_errors_name_the_field(tmp_path: Path, mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "snapshot-small.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SnapshotError) as err:
        Snapshot.load(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_snapshot_unreadable_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        Snapshot.load(bad)


def test_tp_options_derived_from_memory() -> None:
    m70 = ModelInfo(name="70b", weight_memory_gib=140, kv_memory_gib=20)
    assert tp_options(m70, 80) == (2, 4)
    assert tp_options(m70, 24) == (8,)
    assert tp_options(ModelInfo(name="8b", weight_memory_gib=16), 24) == (1, 2)
    explicit = ModelInfo(name="e", weight_memory_gib=16, tensor_parallel_options=(4, 1))
    assert tp_options(explicit, 24) == (1, 4)


def test_throughput_profiles_and_scaling() -> None:
    m = ModelInfo(name="m", weight_memory_gib=10, reference_rps=2.0)
    snap = Snapshot(
        gpu_types=TYPES,
        models=(m, ModelInfo(name="p", weight_memory_gib=10)),
        profiles=(ThroughputProfile(model="p", gpu_type="H100", tp=1, requests_per_s=9.0),),
        tp_scaling_efficiency=0.5,
    )
    table = ThroughputTable(snap)
    assert table.rps(m, "RTX4090", 1) == pytest.approx(2.0)
    assert table.rps(m, "H100", 2) == pytest.approx(2.0 * 3.0 * 2 * 0.5)
    p = snap.model("p")
    assert p is not None
    assert table.rps(p, "H100", 1) == 9.0
    assert table.rps(p, "RTX4090", 1) == pytest.approx(3.0)  # same TP, scaled by speed 1/3
    assert table.rps(p, "RTX4090", 2) == pytest.approx(3.0)  # and by TP: 2 * 0.5


# ---- optimality against brute force -------------------------------------------------------------


def _slot_choices(snap: Snapshot, n: NodeInfo) -> list[list[dict[tuple[str, int, str], int]]]:
    slots = []
    for gtype, idx in available_gpus(snap, n).items():
        items = [
            (m.name, tp)
            for m in snap.models
            if not m.allowed_gpu_types or gtype in m.allowed_gpu_types
            for tp in tp_options(m, MEMORY[gtype])
        ]
        choices = []
        ranges = [range(len(idx) // tp + 1) for _, tp in items]
        for counts in itertools.product(*ranges):
            if sum(c * tp for c, (_, tp) in zip(counts, items, strict=True)) <= len(idx):
                choices.append({(m, tp, gtype): c for c, (m, tp) in zip(counts, items, strict=True) if c})
        slots.append(choices)
    return slots


def brute_force_best(snap: Snapshot, now: float) -> float:
    """The least objective over every placement that holds the hard constraints."""
    eligible = [n for n in snap.nodes if snap.node_accepts_new(n, now)]
    per_node = []
    for n in eligible:
        combos = []
        for parts in itertools.product(*_slot_choices(snap, n)):
            merged: dict[tuple[str, int, str], int] = {}
            for p in parts:
                merged.update(p)
            combos.append(merged)
        per_node.append(combos)
    # Policy: replicas on nodes that leave within the horizon (not draining) keep running, counting for nothing.
    fixed: dict[str, Counter[tuple[str, int, str]]] = {}
    for rep in snap.current:
        n = next(x for x in snap.nodes if x.node_id == rep.node_id)
        if keepable(snap, n, rep) and not snap.node_accepts_new(n, now):
            fixed.setdefault(n.node_id, Counter())[(rep.model, rep.tp, n.gpus[0].type)] += 1
    best = float("inf")
    for choice in itertools.product(*per_node):
        placement = {n.node_id: c for n, c in zip(eligible, choice, strict=True)} | fixed
        count: Counter[str] = Counter()
        for c in choice:
            for (m, _, _), k in c.items():
                count[m] += k
        if any(m.max_replicas and count[m.name] > m.max_replicas for m in snap.models):
            continue
        plan = build_plan(snap, now, placement, planner="brute", status="brute", solve_time_s=0.0)
        if snap.budget_per_hour > 0 and plan.cost_per_hour > snap.budget_per_hour + 1e-9:
            continue
        best = min(best, plan.objective)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force_on_tiny_instances(seed: int) -> None:
    rng = random.Random(seed)
    snap = random_snapshot(rng, n_nodes=2, n_models=2, with_current=seed % 2 == 0)
    snap = snap.model_copy(update={"current": tuple(r for r in snap.current if r.node_id in {"n0", "n1"})})
    plan = compute_plan(snap, NOW, mip_gap=0.0)
    check_plan_valid(snap, NOW, plan)
    expected = brute_force_best(snap, NOW)
    assert plan.status == "optimal"
    assert plan.objective == pytest.approx(expected, abs=1e-4)
    assert plan.solver_objective == pytest.approx(plan.objective, abs=1e-4)


def test_min_replicas_spread_and_infeasible_min_is_reported() -> None:
    snap = Snapshot(
        nodes=(node("a", "RTX4090", 4), node("b", "RTX4090", 4), node("c", "H100", 2)),
        models=(ModelInfo(name="m", weight_memory_gib=8, min_replicas=3),),
        gpu_types=TYPES,
        demand={"m": 1.0},
    )
    plan = compute_plan(snap, NOW)
    assert plan.coverage["m"].distinct_nodes == 3
    assert {a.node_id for a in plan.actions} == {"a", "b", "c"}
    five = snap.model_copy(update={"models": (ModelInfo(name="m", weight_memory_gib=8, min_replicas=5),)})
    plan5 = compute_plan(five, NOW)
    check_plan_valid(five, NOW, plan5)
    assert plan5.coverage["m"].distinct_nodes == 3
    assert any("min_replicas=5 not met" in n for n in plan5.notes)


def test_budget_limits_cost_and_leaves_demand_unmet() -> None:
    snap = Snapshot(
        nodes=(node("a", "H100", 4),),
        models=(ModelInfo(name="m", weight_memory_gib=8),),
        gpu_types=TYPES,
        demand={"m": 100.0},
        budget_per_hour=5.0,
    )
    plan = compute_plan(snap, NOW)
    assert plan.cost_per_hour == pytest.approx(5.0)
    assert plan.coverage["m"].replicas == 2
    assert plan.coverage["m"].fraction < 1.0


def test_leaving_and_draining_nodes() -> None:
    snap = Snapshot(
        nodes=(
            node("leaving", "H100", 2, free=(1,), end_time_unix=int(NOW + 300)),
            node("drain", "H100", 2, free=(1,), draining=True),
            node("stay", "H100", 2),
        ),
        models=(ModelInfo(name="m", weight_memory_gib=8),),
        gpu_types=TYPES,
        demand={"m": 5.0},
        current=(
            RunningReplica(node_id="leaving", model="m", tp=1, gpu_indices=(0,), replica_id="r1"),
            RunningReplica(node_id="drain", model="m", tp=1, gpu_indices=(0,), replica_id="r2"),
            RunningReplica(node_id="gone", model="m", tp=1, gpu_indices=(0,), replica_id="r3"),
        ),
    )
    plan = compute_plan(snap, NOW)
    check_plan_valid(snap, NOW, plan)
    by_id = {a.replica_id: a.kind for a in plan.actions if a.replica_id}
    assert by_id == {"r1": ActionKind.KEEP, "r2": ActionKind.STOP, "r3": ActionKind.STOP}
    starts = [a for a in plan.actions if a.kind is ActionKind.START]
    assert starts and {a.node_id for a in starts} == {"stay"}  # the replacement, made before break
    assert plan.coverage["m"].served_rps == pytest.approx(5.0)


# ---- churn ---------------------------------------------------------------------------------------


def with_plan_running(snap: Snapshot, plan: Plan) -> Snapshot:
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
            update={"free_gpu_indices": tuple(i for i in n.free_gpu_indices if i not in used.get(n.node_id, set()))}
        )
        for n in snap.nodes
    )
    return snap.model_copy(update={"nodes": nodes, "current": running})


@pytest.mark.parametrize("max_single_nodes", [64, 0])
@pytest.mark.parametrize("seed", range(6))
def test_replanning_an_unchanged_snapshot_changes_nothing(seed: int, max_single_nodes: int) -> None:
    rng = random.Random(100 + seed)
    snap = random_snapshot(rng, n_nodes=12, n_models=5, with_current=False)
    first = compute_plan(snap, NOW, mip_gap=0.0)
    again = compute_plan(with_plan_running(snap, first), NOW, mip_gap=0.0, max_single_nodes=max_single_nodes)
    assert again.changes == ()
    assert again.cost_per_hour == pytest.approx(first.cost_per_hour)


# ---- aggregation is exact -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_node_classes_give_the_same_optimum_as_single_nodes(seed: int) -> None:
    rng = random.Random(200 + seed)
    snap = random_snapshot(rng, n_nodes=10, n_models=4)
    grouped = compute_plan(snap, NOW, mip_gap=0.0)
    single = compute_plan(snap, NOW, mip_gap=0.0, group_identical_nodes=False)
    check_plan_valid(snap, NOW, grouped)
    assert grouped.status == single.status == "optimal"
    assert grouped.objective == pytest.approx(single.objective, abs=1e-4)


# ---- limits --------------------------------------------------------------------------------------


def big_snapshot(n_nodes: int, n_models: int, seed: int) -> Snapshot:
    """Partly busy nodes and models of uneven speed: proving optimality takes HiGHS well over 20 s."""
    rng = random.Random(seed)
    nodes = []
    for i in range(n_nodes):
        count = rng.choice((4, 8))
        free = tuple(sorted(rng.sample(range(count), rng.randint(1, count))))
        nodes.append(node(f"n{i:04d}", rng.choice(list(TYPES)), count, free))
    models = tuple(
        ModelInfo(
            name=f"m{j}",
            weight_memory_gib=rng.choice((6, 16, 30, 70)),
            min_replicas=rng.choice((0, 1, 2)),
            reference_rps=rng.uniform(0.3, 3),
        )
        for j in range(n_models)
    )
    demand = {m.name: round(rng.paretovariate(1.2) * 8, 2) for m in models}
    return Snapshot(nodes=tuple(nodes), models=models, gpu_types=TYPES, demand=demand)


def test_time_limit_is_respected() -> None:
    snap = big_snapshot(200, 30, seed=5)
    started = time.perf_counter()
    plan = compute_plan(snap, NOW, time_limit_s=0.5, mip_gap=0.0)
    elapsed = time.perf_counter() - started
    assert plan.status == "feasible"  # stopped by the limit, with the best plan found so far
    assert plan.mip_gap is not None and plan.mip_gap > 0
    assert elapsed < 0.5 + 1.5  # the limit, plus building the model and the plan
    check_plan_valid(snap, NOW, plan)


# ---- baselines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_baselines_are_valid_and_not_better_than_the_milp(seed: int) -> None:
    rng = random.Random(300 + seed)
    snap = random_snapshot(rng, n_nodes=8, n_models=4, with_current=False).model_copy(update={"budget_per_hour": 0.0})
    milp = compute_plan(snap, NOW, mip_gap=0.0)
    for baseline in (plan_single_best_type(snap, NOW), plan_greedy(snap, NOW)):
        check_plan_valid(snap, NOW, baseline)
        assert baseline.status == "baseline"
        assert milp.objective <= baseline.objective + 1e-6
    best = plan_single_best_type(snap, NOW)
    assert len(set(best.gpus_used_by_type)) <= 1


def test_no_solution_keeps_every_keepable_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    import controlplane.planner.model as planner_model

    monkeypatch.setattr(planner_model, "solve_units", lambda *a, **kw: None)  # the solver ran out of time
    snap = Snapshot(
        nodes=(node("a", "H100", 2, free=(1,)), node("d", "H100", 1, free=(), draining=True)),
        models=(ModelInfo(name="m", weight_memory_gib=8),),
        gpu_types=TYPES,
        demand={"m": 50.0},
        current=(
            RunningReplica(node_id="a", model="m", tp=1, gpu_indices=(0,), replica_id="keep-me"),
            RunningReplica(node_id="d", model="m", tp=1, gpu_indices=(0,), replica_id="draining"),
        ),
    )
    plan = compute_plan(snap, NOW)
    assert plan.status == "no_solution"
    assert {a.replica_id: a.kind for a in plan.actions} == {"keep-me": ActionKind.KEEP, "draining": ActionKind.STOP}
    assert any("no solution" in n for n in plan.notes)
