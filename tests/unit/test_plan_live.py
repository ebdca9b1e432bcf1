"""Snapshot assembly from etcd records, plan files and the churn limiter: pure, no etcd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.cli.plan import save_snapshot
from controlplane.keys import Keys
from controlplane.pb import Assignment, Demand, Gpu, InstanceRecord, ModelSpec, NodeRecord
from controlplane.planner import ActionKind, Snapshot, compute_plan
from controlplane.planner.apply import PlanFile, PlanFileError, make_plan_file
from controlplane.planner.daemon import limit_churn
from controlplane.planner.live import (
    ClusterConfig,
    ClusterConfigError,
    LiveRecords,
    assemble_snapshot,
    load_demand,
)

GIB = 1 << 30
NOW = 1_800_000_000.0
CLUSTER = ClusterConfig.model_validate({
    "gpu_types": {"A100-80GB": {"price_per_hour": 1.6, "relative_speed": 2.0},
                  "L4": {"price_per_hour": 0.5, "relative_speed": 1.0}},
    "profiles": [{"model": "small", "gpu_type": "A100-80GB", "tp": 1, "requests_per_s": 5.0},
                 {"model": "not-in-catalog", "gpu_type": "L4", "tp": 1, "requests_per_s": 1.0}],
    "reference_rps": {"big": 2.0},
})


def node(node_id: str, n: int = 4, gpu_type: str = "A100-80GB", *, free: list[int] | None = None,
         pool: bool = True, draining: bool = False, end: int = 0) -> NodeRecord:
    return NodeRecord(node_id=node_id, pool=pool, draining=draining, end_time_unix=end,
                      gpus=[Gpu(index=i, type=gpu_type, memory_bytes=80 * GIB) for i in range(n)],
                      free_gpu_indices=list(range(n)) if free is None else free)


def spec(name: str, weights_gib: float = 10, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, engine="sim", weight_memory_bytes=int(weights_gib * GIB), **kw)  # type: ignore[arg-type]


def assignment(node_id: str, aid: str, model: str, gpus: list[int]) -> Assignment:
    return Assignment(assignment_id=aid, node_id=node_id, model=model, gpu_indices=gpus, tensor_parallel=len(gpus))


def test_pool_nodes_free_gpus_current_from_desired_and_demand_summed() -> None:
    records = LiveRecords(
        revision=42,
        nodes=(node("n1", free=[2, 3]), node("n2"), node("serve-only", pool=False),
               node("n3", draining=True, end=1_900_000_000)),
        instances=(
            # running for a desired assignment: GPUs 0,1 of n1
            InstanceRecord(instance_id="i1", model="small", node_id="n1", gpu_indices=[0, 1], assignment_id="a1"),
            # still draining after its assignment was deleted: GPU 3 of n1 is busy, not free
            InstanceRecord(instance_id="i2", model="small", node_id="n1", gpu_indices=[3], assignment_id="old"),
        ),
        desired=(assignment("n1", "a1", "small", [0, 1]), assignment("n2", "a2", "big", [0])),
        models=(spec("small"), spec("big", 60, min_replicas=1)),
        demand=(Demand(model="small", gateway_id="g1", requests_per_second=2.5),
                Demand(model="small", gateway_id="g2", requests_per_second=1.5),
                Demand(model="big", gateway_id="g1", requests_per_second=1.0)),
    )
    asm = assemble_snapshot(records, CLUSTER)
    snap = asm.snapshot
    assert [n.node_id for n in snap.nodes] == ["n1", "n2", "n3"]
    n1 = snap.nodes[0]
    assert n1.free_gpu_indices == (2,)
    assert n1.gpus[0].memory_gib == pytest.approx(80)
    assert snap.nodes[2].draining and snap.nodes[2].end_time_unix == 1_900_000_000
    assert {(r.node_id, r.replica_id, r.model, r.tp, r.gpu_indices) for r in snap.current} == {
        ("n1", "a1", "small", 2, (0, 1)), ("n2", "a2", "big", 1, (0,))}
    assert snap.demand == {"small": 4.0, "big": 1.0}
    assert [p.model for p in snap.profiles] == ["small"]  # profiles of unknown models are dropped
    big, small = snap.model("big"), snap.model("small")
    assert big is not None and small is not None
    assert big.reference_rps == 2.0 and small.reference_rps == 1.0
    assert big.weight_memory_gib == pytest.approx(60)
    assert asm.invalid == () and asm.warnings == ()

    override = assemble_snapshot(records, CLUSTER, demand_override={"big": 7.0}).snapshot
    assert override.demand == {"big": 7.0}


def test_unknown_gpu_type_leaves_node_and_its_assignments_alone_invalid_ones_are_deleted() -> None:
    records = LiveRecords(
        revision=7,
        nodes=(node("odd", gpu_type="MI300X"), node("n1")),
        desired=(assignment("odd", "keep-me", "small", [0]),
                 assignment("n1", "a-ok", "small", [0]),
                 assignment("n1", "a-overlap", "small", [0]),
                 assignment("n1", "a-nogpu", "small", [9]),
                 assignment("gone", "a-gone", "small", [0])),
        models=(spec("small"),),
    )
    asm = assemble_snapshot(records, CLUSTER)
    assert [n.node_id for n in asm.snapshot.nodes] == ["n1"]
    assert any("MI300X" in w and "odd" in w for w in asm.warnings)
    assert {a.assignment_id for a in asm.invalid} == {"a-overlap", "a-nogpu"}
    assert {r.replica_id for r in asm.snapshot.current} == {"a-ok", "a-gone"}

    plan = compute_plan(asm.snapshot, NOW, time_limit_s=5)
    pf = make_plan_file(plan, keys=Keys("/p"), now=NOW, invalid=asm.invalid)
    stops = {a.assignment_id for a in pf.actions if a.kind is ActionKind.STOP}
    assert {"a-gone", "a-overlap", "a-nogpu"} <= stops          # gone node + invalid: deleted
    assert "keep-me" not in {a.assignment_id for a in pf.actions}  # unpriced node: untouched


def test_plan_file_ids_keep_starts_get_fresh_ones_and_guards_cover_start_nodes(tmp_path: Path) -> None:
    keys = Keys("/p")
    records = LiveRecords(
        revision=100,
        nodes=(node("n1"), node("n2", n=2)),
        desired=(assignment("n1", "a1", "small", [0]),),
        models=(spec("small", min_replicas=2),),
        demand=(Demand(model="small", gateway_id="g", requests_per_second=1.0),),
        mod_revisions={keys.node("n1"): 90, keys.node("n2"): 95, keys.model("small"): 10,
                       keys.assignment("n1", "a1"): 99},
    )
    asm = assemble_snapshot(records, CLUSTER)
    plan = compute_plan(asm.snapshot, NOW, time_limit_s=5)
    pf = make_plan_file(plan, keys=keys, now=NOW, records=records)
    kinds = {(a.kind, a.node_id) for a in pf.actions}
    assert (ActionKind.KEEP, "n1") in kinds and (ActionKind.START, "n2") in kinds  # min_replicas=2: spread
    keep = next(a for a in pf.actions if a.kind is ActionKind.KEEP)
    start = next(a for a in pf.actions if a.kind is ActionKind.START)
    assert keep.assignment_id == "a1"
    assert start.assignment_id.startswith("small-") and start.assignment_id != "a1"
    guards = {g.key: g for g in pf.guards}
    assert guards[keys.node("n2")].mod_revision == 95          # START node: guarded exactly
    assert keys.node("n1") not in guards                       # KEEP-only node: not guarded
    assert guards[keys.model("small")].mod_revision == 10
    assert guards[keys.current_plan].mod_revision == 0         # no plan yet: must still be absent
    assert guards[keys.desired].prefix and guards[keys.desired].mod_revision == 100
    assert pf.read["desired"].keys == 1 and pf.read["nodes"].max_mod_revision == 95

    path = tmp_path / "plan.json"
    pf.save(path)
    assert PlanFile.load(path) == pf
    path.write_text(json.dumps({**json.loads(path.read_text()), "computed_at_revision": -1}))
    with pytest.raises(PlanFileError, match="computed_at_revision"):
        PlanFile.load(path)


def test_saved_snapshot_replays_identically(tmp_path: Path) -> None:
    records = LiveRecords(revision=5, nodes=(node("n1"),), desired=(assignment("n1", "a1", "small", [1]),),
                          models=(spec("small"),), demand=(Demand(model="small", requests_per_second=3.0),))
    snap = assemble_snapshot(records, CLUSTER).snapshot
    for name in ("snap.yaml", "snap.json"):
        save_snapshot(snap, tmp_path / name)
        assert Snapshot.load(tmp_path / name) == snap


def test_cluster_and_demand_files_report_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text("gpu_types:\n  H100: {price_per_hour: -1, relative_speed: 1}\n")
    with pytest.raises(ClusterConfigError, match=r"gpu_types\.H100\.price_per_hour"):
        ClusterConfig.load(bad)
    bad.write_text("gpu_typos: {}\n")
    with pytest.raises(ClusterConfigError, match="gpu_typos"):
        ClusterConfig.load(bad)
    assert ClusterConfig.load(Path(__file__).parents[2] / "examples" / "cluster.yaml").gpu_types["H100"]
    demand = tmp_path / "demand.yaml"
    demand.write_text("demand: {a: 1.5, b: 2}\n")
    assert load_demand(demand) == {"a": 1.5, "b": 2.0}
    demand.write_text("a: lots\n")
    with pytest.raises(ValueError, match="demand\\['a'\\]"):
        load_demand(demand)


def _churn_snapshot() -> Snapshot:
    """Four models with different demand, 12 GPUs, plus a replica of a removed model."""
    return Snapshot.model_validate({
        "gpu_types": {"G": {"price_per_hour": 1.0, "relative_speed": 1.0}},
        "nodes": [{"node_id": f"n{i}", "gpus": [{"index": j, "type": "G", "memory_gib": 80} for j in range(2)],
                   "free_gpu_indices": [0, 1]} for i in range(6)],
        "models": [{"name": f"m{k}", "weight_memory_gib": 10, "reference_rps": 1.0, "min_replicas": 2 * (k == 2)}
                   for k in range(4)],
        "demand": {"m0": 1.0, "m1": 4.0, "m2": 2.0, "m3": 3.0},
        "current": [{"node_id": "n0", "model": "removed", "tp": 1, "gpu_indices": [0], "replica_id": "r-old"}],
    })


def test_churn_cap_keeps_the_most_valuable_changes_and_always_the_forced_stops() -> None:
    snap = _churn_snapshot()
    full = compute_plan(snap, NOW, time_limit_s=5)
    starts = [a for a in full.actions if a.kind is ActionKind.START]
    assert len(starts) == 10  # 1+4+2+3 replicas at 1 req/s each
    capped = limit_churn(snap, NOW, full, max_churn=3)
    capped_starts = [a for a in capped.actions if a.kind is ActionKind.START]
    assert len(capped_starts) == 3
    # the forced STOP (model gone) is included and not counted
    assert [a.replica_id for a in capped.actions if a.kind is ActionKind.STOP] == ["r-old"]
    # m2's min_replicas=2 (penalty 1000 per missing node) outweighs serving demand: both go first
    assert sorted(a.model for a in capped_starts).count("m2") == 2
    assert capped.coverage["m2"].distinct_nodes == 2
    served = sum(c.served_rps for c in capped.coverage.values())
    assert served == pytest.approx(3.0)
    assert capped.objective < limit_churn(snap, NOW, full, max_churn=1).objective
    assert any("churn capped at 3" in n for n in capped.notes)
    # a cap the plan fits in changes nothing
    assert limit_churn(snap, NOW, full, max_churn=50) is full


def test_churn_cap_moves_a_replacement_with_the_stop_it_needs() -> None:
    """On a full node, replacing a low-value replica needs its STOP: both go together or not at all."""
    snap = Snapshot.model_validate({
        "gpu_types": {"G": {"price_per_hour": 1.0, "relative_speed": 1.0}},
        "nodes": [{"node_id": "n0", "gpus": [{"index": 0, "type": "G", "memory_gib": 80}], "free_gpu_indices": []}],
        "models": [{"name": "cold", "weight_memory_gib": 10}, {"name": "hot", "weight_memory_gib": 10}],
        "demand": {"hot": 1.0},
        "current": [{"node_id": "n0", "model": "cold", "tp": 1, "gpu_indices": [0], "replica_id": "c1"}],
    })
    full = compute_plan(snap, NOW, time_limit_s=5)
    assert sorted(a.kind.value for a in full.changes) == ["START", "STOP"]
    assert len(limit_churn(snap, NOW, full, max_churn=1).changes) == 0   # the pair does not fit in 1
    two = limit_churn(snap, NOW, full, max_churn=2)
    assert sorted(a.kind.value for a in two.changes) == ["START", "STOP"]
