"""Obtainable capacity in the planner's MILP (controlplane/planner/obtainable.py).

Exactness: a class of ``slots`` job slots of ``gpus`` GPUs, with no start penalty and no limits,
is the same decision as ``slots`` extra free nodes of that size; so the joint MILP's optimum must
equal `compute_plan`'s on the snapshot with those nodes added (both solved to a zero gap).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_planner import MEMORY, NOW, TYPES, node
from test_planner_props import SETTINGS, snapshots

from controlplane.harvest.acquire import Obtainable, acquire, acquire_greedy
from controlplane.harvest.model import HarvestSettings
from controlplane.planner import ModelInfo, Snapshot, compute_plan
from controlplane.planner.model import plan_with_obtainable
from controlplane.planner.obtainable import ObtainableClass, ObtainableSpec


def at_most_one_replica_minimum(snap: Snapshot) -> Snapshot:
    """Spread over distinct nodes (min_replicas >= 2) is what obtainable classes do not model."""
    models = tuple(m.model_copy(update={"min_replicas": min(m.min_replicas, 1)}) for m in snap.models)
    return snap.model_copy(update={"models": models})


@SETTINGS
@given(snapshots(max_nodes=4, max_models=3), st.sampled_from(sorted(TYPES)), st.sampled_from((1, 2, 3, 4, 6)),
       st.integers(1, 3))
def test_an_obtainable_class_is_exactly_that_many_free_nodes(snap: Snapshot, gtype: str, gpus: int, slots: int) -> None:
    snap = at_most_one_replica_minimum(snap)
    spec = ObtainableSpec(classes=(ObtainableClass("c", gtype, MEMORY[gtype], gpus, slots,
                                                   TYPES[gtype].price_per_hour),), job_penalty=0.0)
    joint = plan_with_obtainable(snap, NOW, spec, mip_gap=0.0)
    extra = tuple(node(f"obtainable-{i}", gtype, gpus) for i in range(slots))
    reference = compute_plan(snap.model_copy(update={"nodes": (*snap.nodes, *extra)}), NOW, mip_gap=0.0)
    assert joint.objective is not None
    assert joint.objective == pytest.approx(reference.objective, abs=1e-4)


@SETTINGS
@given(snapshots(max_nodes=3, max_models=3), st.sampled_from(sorted(TYPES)), st.sampled_from((1, 2, 4, 8)),
       st.integers(1, 4), st.sampled_from((0.0, 1.0, 3.5, math.inf)), st.integers(0, 3))
def test_acquisitions_respect_the_gpu_hours_the_jobs_and_the_slots(
        snap: Snapshot, gtype: str, gpus: int, slots: int, hours_left: float, max_jobs: int) -> None:
    spec = ObtainableSpec(classes=(ObtainableClass("c", gtype, MEMORY[gtype], gpus, slots,
                                                   TYPES[gtype].price_per_hour),),
                          start_latency_s=300, gpu_hours_left=hours_left, time_limit_h=2.0, max_jobs=max_jobs)
    result = plan_with_obtainable(snap, NOW, spec)
    assert sum(j.gpus for j in result.jobs) * 2.0 <= hours_left + 1e-9
    assert len(result.jobs) <= min(max_jobs, slots)
    for job in result.jobs:
        assert 0 < job.gpus <= gpus and sum(tp for _, tp in job.replicas) == job.gpus
        for model, tp in job.replicas:
            info = snap.model(model)
            assert info is not None and tp * MEMORY[gtype] >= info.memory_gib


SETTINGS_H = HarvestSettings(partitions=("gpu",), gres_types={"a100": "H100", "rtx": "RTX4090"},
                             gpu_memory_gib={"H100": 80.0, "RTX4090": 24.0}, time_limit_s=3600, max_jobs=4,
                             start_latency_s=0)


def test_one_decision_beats_placing_first_and_acquiring_after() -> None:
    """The pool has one free H100. Placing first puts `small` there (it serves more demand) and
    then has to buy an H100 for `big` (6.0/h with the starts); deciding both at once keeps the
    H100 for `big` and buys two cheap RTX4090s for `small` (4.8/h)."""
    snap = Snapshot(nodes=(node("p1", "H100", 1),), gpu_types=TYPES,
                    models=(ModelInfo(name="small", weight_memory_gib=16, reference_rps=1.0),
                            ModelInfo(name="big", weight_memory_gib=60, reference_rps=1.0)),
                    demand={"small": 2.0, "big": 1.0})
    capacity = [Obtainable("gpu", "n1", "a100", "H100", 1, 80.0, 2.5),
                *(Obtainable("gpu", f"n{i}", "rtx", "RTX4090", 1, 24.0, 0.4) for i in (2, 3))]
    joint = acquire(snap, capacity, SETTINGS_H, NOW, max_new_jobs=4, gpu_hours_left=math.inf)
    greedy = acquire_greedy(snap, capacity, SETTINGS_H, NOW, max_new_jobs=4, gpu_hours_left=math.inf)
    assert [(s.gpu_type, s.models) for s in joint.submits] == [("RTX4090", ("small",))] * 2
    assert [(s.gpu_type, s.models) for s in greedy.submits] == [("H100", ("big",))]
    assert not joint.unmet_rps


def test_two_models_share_one_job_when_jobs_are_scarce() -> None:
    snap = Snapshot(gpu_types=TYPES, models=(ModelInfo(name="a", weight_memory_gib=16, reference_rps=1.0),
                                             ModelInfo(name="b", weight_memory_gib=16, reference_rps=1.0)),
                    demand={"a": 0.5, "b": 0.5})
    capacity = [Obtainable("gpu", f"n{i}", "rtx", "RTX4090", 2, 24.0, 0.4) for i in range(3)]
    result = acquire(snap, capacity, SETTINGS_H, NOW, max_new_jobs=1, gpu_hours_left=math.inf)
    (submit,) = result.submits
    assert submit.gpus == 2 and submit.models == ("a", "b") and not result.unmet_rps


def test_budget_and_job_limits_are_named_when_they_hold_demand_back() -> None:
    snap = Snapshot(gpu_types=TYPES, models=(ModelInfo(name="a", weight_memory_gib=16, reference_rps=1.0),),
                    demand={"a": 3.0})
    capacity = [Obtainable("gpu", f"n{i}", "rtx", "RTX4090", 1, 24.0, 0.4) for i in range(3)]
    budget = acquire(snap, capacity, SETTINGS_H, NOW, max_new_jobs=4, gpu_hours_left=1.5)
    assert len(budget.submits) == 1 and budget.blocked_by_budget and not budget.blocked_by_jobs
    jobs = acquire(snap, capacity, SETTINGS_H, NOW, max_new_jobs=2, gpu_hours_left=math.inf)
    assert len(jobs.submits) == 2 and jobs.blocked_by_jobs and not jobs.blocked_by_budget
    assert jobs.unmet_rps == {"a": pytest.approx(1.0)}


def test_odd_sized_slots_pack_power_of_two_replicas_exactly() -> None:
    """Slots of 3 GPUs hold one TP-2 replica each (not 1.5): two slots give two replicas, two jobs."""
    names = ("wide-a", "wide-b")
    snap = Snapshot(gpu_types=TYPES, models=tuple(ModelInfo(name=n, weight_memory_gib=30, reference_rps=1.0)
                                                  for n in names), demand=dict.fromkeys(names, 10.0))
    spec = ObtainableSpec(classes=(ObtainableClass("c", "RTX4090", 24.0, 3, 2, 0.4),))
    result = plan_with_obtainable(snap, NOW, spec, mip_gap=0.0)
    assert [j.gpus for j in result.jobs] == [2, 2]
    assert [tp for j in result.jobs for _, tp in j.replicas] == [2, 2]  # either model: they are alike
