"""The harvester's pure decision core: acquisitions, releases, timeouts, budget, adoption."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from controlplane.harvest.decide import decide
from controlplane.harvest.model import HarvestPlan, HarvestSettings, PoolView, SlurmView, budget_of
from controlplane.harvest.slurm import SlurmJobInfo, SlurmNode
from controlplane.pb import HarvestJob, HarvestJobState
from controlplane.planner.snapshot import GpuInfo, NodeInfo, Snapshot

S = HarvestJobState
NOW = 1_800_000_000.0
NOW_MS = int(NOW * 1000)

SETTINGS = HarvestSettings(
    partitions=("gpu",), gres_types={"a100": "A100-80GB", "rtx4090": "RTX4090"},
    gpu_memory_gib={"A100-80GB": 80.0, "RTX4090": 24.0}, interval_s=10, idle_release_after_s=60,
    pending_timeout_s=120, join_timeout_s=300, drain_timeout_s=30, time_limit_s=3600, max_jobs=4,
    start_latency_s=60, job_name="modelpool-harvest-test")


def snapshot(demand: Mapping[str, float], nodes: Sequence[NodeInfo] = (), current: Sequence[dict[str, object]] = (),
             weight_gib: float = 16.0) -> Snapshot:
    return Snapshot.from_data({
        "gpu_types": {"A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
                      "RTX4090": {"price_per_hour": 0.8, "relative_speed": 1.0}},
        "models": [{"name": "small", "weight_memory_gib": weight_gib, "kv_memory_gib": 2, "reference_rps": 2.0},
                   {"name": "big", "weight_memory_gib": 60, "kv_memory_gib": 10, "reference_rps": 1.0}],
        "nodes": [n.model_dump() for n in nodes], "current": list(current), "demand": dict(demand),
        "horizon_s": 300,
    })


def slurm_node(name: str = "n1", state: str = "IDLE", a100: tuple[int, int] = (2, 0),
               rtx: tuple[int, int] = (2, 0), partitions: tuple[str, ...] = ("gpu",)) -> SlurmNode:
    return SlurmNode(name=name, state=state, partitions=partitions, gpus_total={"a100": a100[0], "rtx4090": rtx[0]},
                     gpus_used={"a100": a100[1], "rtx4090": rtx[1]}, cpus=8, cpus_alloc=0)


def sjob(job_id: str, state: str = "RUNNING", start: float = NOW - 600, gpus: Mapping[str, int] | None = None,
         end: float = 0.0) -> SlurmJobInfo:
    running = state == "RUNNING"
    return SlurmJobInfo(job_id=job_id, name=SETTINGS.job_name, state=state, partition="gpu",
                        gpus=dict(gpus or {"rtx4090": 1}), start_unix=int(start) if running or end else 0,
                        end_unix=int(end or (start + 3600 if running else 0)), time_limit_s=3600,
                        node="n1" if running else "", reason="None" if running else "Resources")


def record(job_id: str, state: int = S.HARVEST_RUNNING, gpus: int = 1, gpu_type: str = "RTX4090",
           started: float = NOW - 600, submitted: float = NOW - 700, node_id: str = "", **extra: object) -> HarvestJob:
    job = HarvestJob(job_id=job_id, state=state, partition="gpu", gpu_count=gpus, gpu_type=gpu_type,  # type: ignore[arg-type]
                     slurm_gres_type="rtx4090" if gpu_type == "RTX4090" else "a100", models=["small"],
                     submitted_unix_ms=int(submitted * 1000), time_limit_s=3600,
                     started_unix_ms=int(started * 1000) if started else 0, node_id=node_id,
                     state_since_unix_ms=int(submitted * 1000), **extra)  # type: ignore[arg-type]
    return job


def pool_node(node_id: str, gpus: int = 1, gpu_type: str = "RTX4090", memory: float = 24.0,
              free: Sequence[int] | None = None) -> NodeInfo:
    return NodeInfo(node_id=node_id, gpus=tuple(GpuInfo(index=i, type=gpu_type, memory_gib=memory)
                                                for i in range(gpus)),
                    free_gpu_indices=tuple(range(gpus)) if free is None else tuple(free),
                    end_time_unix=int(NOW + 3000))


def run(snap: Snapshot, nodes: Sequence[SlurmNode] = (), jobs: Sequence[SlurmJobInfo] = (),
        records: Mapping[str, HarvestJob] | None = None, settings: HarvestSettings = SETTINGS, now: float = NOW,
        **pool: object) -> HarvestPlan:
    view = PoolView(snapshot=snap, **pool)  # type: ignore[arg-type]
    return decide(view, SlurmView(tuple(nodes), {j.job_id: j for j in jobs}), records or {}, settings, now)


# -- acquiring --------------------------------------------------------------------------------------


def test_unmet_demand_gets_a_job_of_the_cheapest_sufficient_gpu_type() -> None:
    plan = run(snapshot({"small": 1.5}), [slurm_node()])
    (submit,) = plan.submits
    assert (submit.partition, submit.slurm_type, submit.gpu_type, submit.gpus) == ("gpu", "rtx4090", "RTX4090", 1)
    assert submit.models == ("small",) and "small" in submit.reason
    assert plan.changes


def test_a_model_too_big_for_the_cheap_type_gets_the_one_it_fits() -> None:
    plan = run(snapshot({"big": 0.5}), [slurm_node()])
    assert [(s.slurm_type, s.gpus) for s in plan.submits] == [("a100", 1)]


def test_no_demand_no_job_and_free_pool_gpus_come_first() -> None:
    assert not run(snapshot({}), [slurm_node()]).changes
    # the pool has a free RTX4090 node: the planner will place there; nothing to acquire
    plan = run(snapshot({"small": 1.5}, nodes=[pool_node("p1")]), [slurm_node()])
    assert not plan.submits and not plan.unmet_rps


def test_a_pending_job_counts_as_capacity_on_its_way() -> None:
    pending = record("7", state=S.HARVEST_PENDING, started=0, submitted=NOW - 5)
    plan = run(snapshot({"small": 1.5}), [slurm_node()], [sjob("7", "PENDING")], {"7": pending})
    assert not plan.submits and not plan.cancels


def test_only_idle_gpus_of_schedulable_nodes_in_our_partitions_count() -> None:
    snap = snapshot({"big": 0.5})
    assert not run(snap, [slurm_node(a100=(2, 2))]).submits              # both A100s in use
    assert not run(snap, [slurm_node(state="IDLE+DRAIN")]).submits       # drained
    assert not run(snap, [slurm_node(partitions=("other",))]).submits    # not our partition
    plan = run(snap, [slurm_node(a100=(2, 2)), slurm_node("n2", "MIXED", a100=(4, 3))])
    assert [(s.slurm_type, s.gpus) for s in plan.submits] == [("a100", 1)]


def test_unservable_demand_is_reported() -> None:
    plan = run(snapshot({"big": 0.5}), [slurm_node(a100=(0, 0))])
    assert not plan.submits and plan.unmet_rps == {"big": pytest.approx(0.5)}
    assert any("no idle Slurm GPU" in n for n in plan.notes)


# -- budget and max jobs ----------------------------------------------------------------------------


def test_budget_counts_actual_running_time_and_reserves_the_rest_of_the_limit() -> None:
    ended = record("2", state=S.HARVEST_ENDED, gpus=1, started=NOW - 7200, ended_unix_ms=NOW_MS - 3600_000)
    jobs = {"1": record("1", gpus=2, started=NOW - 1800), "2": ended}
    b = budget_of(jobs, 10.0, NOW_MS)
    assert b.used == pytest.approx(2 * 0.5 + 1.0) and b.reserved == pytest.approx(2 * 0.5)
    assert b.left == pytest.approx(10 - 2 - 1)
    # usage older than 24 h leaves the window
    old = {"3": record("3", state=S.HARVEST_ENDED, started=NOW - 90000, ended_unix_ms=NOW_MS - 86000_000)}
    assert budget_of(old, 10.0, NOW_MS).used == pytest.approx(400 / 3600)


def test_exhausted_budget_means_no_new_job_and_says_why() -> None:
    spent = {"1": record("1", state=S.HARVEST_ENDED, gpus=4, started=NOW - 3 * 3600,
                         ended_unix_ms=NOW_MS - 3600_000, node_id="x")}
    st = replace(SETTINGS, budget_gpu_hours_per_day=8.5)  # 8 used; a 1 h job of 1 GPU needs 1 more
    plan = run(snapshot({"small": 1.5}), [slurm_node()], records=spent, settings=st)
    assert not plan.submits
    assert any(n.startswith("budget exhausted") for n in plan.notes), plan.notes
    assert plan.unmet_rps == {"small": pytest.approx(1.5)}
    ok = run(snapshot({"small": 1.5}), [slurm_node()], records=spent, settings=replace(st, budget_gpu_hours_per_day=9))
    assert len(ok.submits) == 1


def test_max_jobs_caps_active_jobs() -> None:
    busy = {str(i): record(str(i), node_id=f"nd{i}", gpu_type="A100-80GB") for i in range(2)}
    slurm_jobs = [sjob(str(i), gpus={"a100": 1}) for i in range(2)]
    nodes = [pool_node(f"nd{i}", gpu_type="A100-80GB", memory=80, free=[]) for i in range(2)]
    current = [{"node_id": f"nd{i}", "model": "big", "tp": 1, "gpu_indices": [0], "replica_id": f"r{i}"}
               for i in range(2)]
    st = replace(SETTINGS, max_jobs=2)
    demand = {"small": 1.5, "big": 10.0}  # both kept busy by "big"
    plan = run(snapshot(demand, nodes=nodes, current=current), [slurm_node()], slurm_jobs, busy, st,
               node_by_job={str(i): f"nd{i}" for i in range(2)}, busy_nodes=frozenset({"nd0", "nd1"}))
    assert not plan.submits and any("--max-jobs 2 reached" in n for n in plan.notes)


def test_budget_guard_releases_when_the_limit_was_lowered() -> None:
    jobs = {"1": record("1", gpus=2, started=NOW - 1800, node_id="nd1")}
    st = replace(SETTINGS, budget_gpu_hours_per_day=1.5)  # 1 used + 1 reserved > 1.5
    plan = run(snapshot({}, nodes=[pool_node("nd1", 2)]), [], [sjob("1")], jobs, st, node_by_job={"1": "nd1"},
               busy_nodes=frozenset({"nd1"}))
    assert [d.job_id for d in plan.drains] == ["1"] and "budget" in plan.drains[0].reason


# -- giving back --------------------------------------------------------------------------------------


def test_idle_job_is_drained_after_idle_release_after_then_cancelled_when_its_engines_are_gone() -> None:
    snap = snapshot({}, nodes=[pool_node("nd1")])
    rec = {"1": record("1", node_id="nd1")}
    by_job = {"1": "nd1"}
    first = run(snap, [], [sjob("1")], rec, node_by_job=by_job)
    job = first.records["1"]
    assert job.idle_since_unix_ms == NOW_MS and not first.changes            # idle from now on
    later = run(snap, [], [sjob("1")], {"1": job}, now=NOW + 59, node_by_job=by_job)
    assert not later.changes                                                  # not yet 60 s
    release = run(snap, [], [sjob("1")], {"1": job}, now=NOW + 61, node_by_job=by_job)
    (drain,) = release.drains
    assert drain.node_id == "nd1" and "no assignment for 61s" in drain.reason
    releasing = release.records["1"]
    assert releasing.state == S.HARVEST_RELEASING
    # the drain is not done while an engine is still on the node
    waiting = run(snap, [], [sjob("1")], {"1": releasing}, now=NOW + 65, nodes_with_instances=frozenset({"nd1"}),
                  node_by_job=by_job)
    assert not waiting.cancels
    gone = run(snap, [], [sjob("1")], {"1": releasing}, now=NOW + 66, node_by_job=by_job)
    assert [c.job_id for c in gone.cancels] == ["1"] and gone.records["1"].state == S.HARVEST_CANCELLED
    # the drain timeout cancels even with an engine left
    late = run(snap, [], [sjob("1")], {"1": releasing}, now=NOW + 61 + 31, nodes_with_instances=frozenset({"nd1"}),
               node_by_job=by_job)
    assert [c.job_id for c in late.cancels] == ["1"]


def test_an_assignment_resets_the_idle_clock() -> None:
    job = record("1", node_id="nd1", idle_since_unix_ms=NOW_MS - 50_000)
    plan = run(snapshot({}, nodes=[pool_node("nd1")]), [], [sjob("1")], {"1": job}, node_by_job={"1": "nd1"},
               busy_nodes=frozenset({"nd1"}))
    assert plan.records["1"].idle_since_unix_ms == 0 and not plan.changes


def test_pending_too_long_and_never_joining_are_cancelled() -> None:
    pending = record("1", state=S.HARVEST_PENDING, started=0, submitted=NOW - 121)
    plan = run(snapshot({}), [], [sjob("1", "PENDING")], {"1": pending})
    assert [c.job_id for c in plan.cancels] == ["1"] and "pending for 121s" in plan.cancels[0].reason
    lonely = record("2", started=NOW - 301)
    plan = run(snapshot({}), [], [sjob("2", start=NOW - 301)], {"2": lonely})
    assert [c.job_id for c in plan.cancels] == ["2"] and "did not register" in plan.cancels[0].reason


def test_a_job_slurm_ended_is_recorded_with_its_end_and_deleted_after_the_window() -> None:
    job = record("1", node_id="nd1", end_reason="")
    ended = run(snapshot({}), [], [sjob("1", "PREEMPTED", start=NOW - 600, end=NOW - 30)], {"1": job},
                drained_by_us=frozenset({"nd1"}))
    rec = ended.records["1"]
    assert rec.state == S.HARVEST_ENDED and rec.ended_unix_ms == NOW_MS - 30_000
    assert rec.end_reason == "preempted by Slurm" and ended.clear_controls == ["nd1"]
    vanished = run(snapshot({}), [], [], {"1": job})
    assert vanished.records["1"].ended_unix_ms == NOW_MS and vanished.records["1"].end_reason == "left Slurm's queue"
    later = run(snapshot({}), [], [], {"1": rec}, now=NOW + 86401)
    assert later.deletes == ["1"]


def test_requeue_banks_the_run_and_the_next_start_counts_anew() -> None:
    job = record("1", gpus=2, started=NOW - 1800, node_id="nd1")
    requeued = run(snapshot({}), [], [sjob("1", "PENDING")], {"1": job})
    rec = requeued.records["1"]
    assert rec.state == S.HARVEST_PENDING and rec.started_unix_ms == 0 and rec.gpu_hours == pytest.approx(1.0)
    again = run(snapshot({}), [], [sjob("1", start=NOW + 60)], {"1": rec}, now=NOW + 660)
    assert again.records["1"].state == S.HARVEST_RUNNING
    assert budget_of(again.records, 0, int((NOW + 660) * 1000)).used == pytest.approx(1.0 + 2 * 600 / 3600)


def test_a_job_of_ours_without_a_record_is_adopted() -> None:
    plan = run(snapshot({}), [], [sjob("99", gpus={"a100": 2})], {}, node_by_job={"99": "gpu-n1-job99"})
    rec = plan.records["99"]
    assert (rec.state, rec.gpu_type, rec.gpu_count, rec.node_id) == (S.HARVEST_RUNNING, "A100-80GB", 2, "gpu-n1-job99")
    assert rec.reason.startswith("adopted") and any("adopted job 99" in n for n in plan.notes)


def test_decide_is_deterministic_and_does_not_touch_its_inputs() -> None:
    rec = {"1": record("1", node_id="nd1")}
    before = rec["1"].SerializeToString()
    args = (snapshot({"small": 3.0}, nodes=[pool_node("nd1")]), [slurm_node()], [sjob("1")], rec)
    a, b = run(*args, node_by_job={"1": "nd1"}), run(*args, node_by_job={"1": "nd1"})
    assert a.submits == b.submits and a.notes == b.notes
    assert rec["1"].SerializeToString() == before
