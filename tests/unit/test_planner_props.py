"""Property tests: on random small snapshots every planner holds the hard constraints."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner import MEMORY, NOW, TYPES, check_plan_valid, node

from controlplane.planner import (
    ActionKind,
    ModelInfo,
    PlanWeights,
    RunningReplica,
    Snapshot,
    compute_plan,
    plan_greedy,
    plan_single_best_type,
    tp_options,
)

SETTINGS = settings(
    max_examples=int(os.environ.get("PLANNER_PROP_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def snapshots(draw: st.DrawFn, max_nodes: int = 6, max_models: int = 4) -> Snapshot:
    n_models = draw(st.integers(1, max_models))
    models = tuple(
        ModelInfo(
            name=f"m{j}",
            weight_memory_gib=draw(st.sampled_from((6.0, 16.0, 30.0, 60.0, 140.0))),
            kv_memory_gib=draw(st.sampled_from((0.0, 4.0))),
            min_replicas=draw(st.integers(0, 3)),
            max_replicas=draw(st.sampled_from((0, 0, 2, 4))),
            allowed_gpu_types=tuple(draw(st.sets(st.sampled_from(sorted(TYPES)), max_size=2))),
            reference_rps=draw(st.sampled_from((0.5, 1.0, 3.0))),
        )
        for j in range(n_models)
    )
    nodes = []
    current = []
    for i in range(draw(st.integers(1, max_nodes))):
        gtype = draw(st.sampled_from(sorted(TYPES)))
        count = draw(st.sampled_from((1, 2, 4, 8)))
        busy = draw(st.sets(st.integers(0, count - 1), max_size=count))
        end = draw(st.sampled_from((0, 0, int(NOW + 60), int(NOW + 7200))))
        nodes.append(
            node(
                f"n{i}",
                gtype,
                count,
                tuple(g for g in range(count) if g not in busy),
                end_time_unix=end,
                draining=draw(st.booleans()) and draw(st.booleans()),
            )
        )
        # Some busy GPUs run replicas we know about (possibly of models that no longer fit there).
        spare: list[int] = sorted(busy)
        while spare:
            if not draw(st.booleans()):
                break
            model = draw(st.sampled_from(models))
            tp = draw(st.sampled_from((1, 2)))
            if len(spare) < tp:
                break
            current.append(
                RunningReplica(
                    node_id=f"n{i}",
                    model=model.name,
                    tp=tp,
                    gpu_indices=tuple(spare[:tp]),
                    replica_id=f"r{i}-{spare[0]}",
                )
            )
            spare = spare[tp:]
    demand = {m.name: draw(st.sampled_from((0.0, 0.5, 2.0, 10.0))) for m in models}
    return Snapshot(
        nodes=tuple(nodes),
        models=models,
        gpu_types=TYPES,
        demand=demand,
        budget_per_hour=draw(st.sampled_from((0.0, 0.0, 3.0, 10.0))),
        current=tuple(current),
        weights=PlanWeights(unmet_demand_penalty=20.0, churn_penalty=0.5, min_replicas_penalty=200.0),
    )


@SETTINGS
@given(snapshots())
def test_milp_plans_hold_hard_constraints(snap: Snapshot) -> None:
    plan = compute_plan(snap, NOW, mip_gap=0.0)
    check_plan_valid(snap, NOW, plan)
    assert plan.status == "optimal"
    assert plan.solver_objective == pytest.approx(plan.objective, abs=1e-4)
    # Every running replica gets exactly one decision.
    decided = Counter(a.replica_id for a in plan.actions if a.kind is not ActionKind.START)
    assert decided == Counter(r.replica_id for r in snap.current)


@SETTINGS
@given(snapshots())
def test_aggregating_nodes_is_exact(snap: Snapshot) -> None:
    grouped = compute_plan(snap, NOW, mip_gap=0.0)
    single = compute_plan(snap, NOW, mip_gap=0.0, group_identical_nodes=False)
    assert grouped.objective == pytest.approx(single.objective, abs=1e-4)


@SETTINGS
@given(snapshots())
def test_baselines_hold_hard_constraints(snap: Snapshot) -> None:
    snap = snap.model_copy(update={"budget_per_hour": 0.0})  # baselines ignore the budget by design
    for plan in (plan_single_best_type(snap, NOW), plan_greedy(snap, NOW)):
        check_plan_valid(snap, NOW, plan)


@SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from(sorted(TYPES)), st.sampled_from((1, 2, 4))), min_size=1, max_size=6),
    st.integers(1, 5),
    st.sampled_from((6.0, 30.0, 60.0)),
)
def test_min_replicas_land_on_distinct_nodes_when_feasible(
    shapes: list[tuple[str, int]], min_replicas: int, weights_gib: float
) -> None:
    nodes = tuple(node(f"n{i}", t, c) for i, (t, c) in enumerate(shapes))
    model = ModelInfo(name="m", weight_memory_gib=weights_gib, min_replicas=min_replicas)
    snap = Snapshot(nodes=nodes, models=(model,), gpu_types=TYPES, demand={"m": 0.1})
    can_host = sum(1 for t, c in shapes if any(tp <= c for tp in tp_options(model, MEMORY[t])))
    plan = compute_plan(snap, NOW, mip_gap=0.0)
    check_plan_valid(snap, NOW, plan)
    assert plan.coverage["m"].distinct_nodes >= min(min_replicas, can_host)
    assert (plan.coverage["m"].distinct_nodes < min_replicas) == any("min_replicas" in n for n in plan.notes)


@SETTINGS
@given(snapshots())
def test_running_nodes_in_classes_stay_valid_and_never_beat_the_exact_model(snap: Snapshot) -> None:
    # max_single_nodes=0: every running node joins its class (the large-pool mode), a restriction.
    pooled = compute_plan(snap, NOW, mip_gap=0.0, max_single_nodes=0)
    check_plan_valid(snap, NOW, pooled)
    assert pooled.solver_objective == pytest.approx(pooled.objective, abs=1e-4)
    exact = compute_plan(snap, NOW, mip_gap=0.0)
    assert exact.objective <= pooled.objective + 1e-4


def test_replicas_kept_on_one_node_count_once_towards_min_replicas() -> None:
    # Found by hypothesis: two running replicas of m0 on n2 were counted as two distinct nodes in
    # the pooled model, so it promised min_replicas=2 the exact model (rightly) could not.
    a100 = {"type": "A100-40GB", "memory_gib": 40.0}
    snap = Snapshot.model_validate({
        "nodes": [
            {"node_id": "n0", "gpus": [{"index": 0, **a100}], "free_gpu_indices": [0]},
            {"node_id": "n1", "gpus": [{"index": 0, **a100}], "free_gpu_indices": [0]},
            {"node_id": "n2", "gpus": [{"index": i, **a100} for i in range(4)], "free_gpu_indices": []},
        ],
        "models": [{"name": "m0", "weight_memory_gib": 60.0, "min_replicas": 2, "reference_rps": 0.5}],
        "gpu_types": {"A100-40GB": {"price_per_hour": 1.2, "relative_speed": 1.6}},
        "demand": {"m0": 0.0},
        "current": [{"node_id": "n2", "model": "m0", "tp": 2, "gpu_indices": [0, 1], "replica_id": "r2-0"},
                    {"node_id": "n2", "model": "m0", "tp": 2, "gpu_indices": [2, 3], "replica_id": "r2-2"}],
    })
    for single in (0, 100):
        plan = compute_plan(snap, NOW, mip_gap=0.0, max_single_nodes=single)
        check_plan_valid(snap, NOW, plan)
        assert plan.solver_objective == pytest.approx(plan.objective, abs=1e-4)
        assert plan.coverage["m0"].distinct_nodes == 1
        assert any("min_replicas" in n for n in plan.notes)
