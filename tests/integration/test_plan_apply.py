"""`ctl plan` / `ctl apply` / the planner daemon against a real etcd.

The CLI runs as a real subprocess (its stdout must be clean JSON with -o json); daemons run in
this process so the test can revoke a leader's lease and watch the other take over.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from controlplane.cli.common import ExitCode
from controlplane.keys import Keys, decode
from controlplane.pb import Assignment, Gpu, ModelSpec, NodeRecord, PlanRecord
from controlplane.planner.apply import StalePlan, apply_plan, plan_from_etcd
from controlplane.planner.daemon import DaemonConfig, PlannerDaemon
from controlplane.planner.live import ClusterConfig
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import Sim, eventually

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "examples" / "cluster.yaml"
GIB = 1 << 30
CTL = [sys.executable, "-m", "controlplane.cli.main"]


async def ctl(config: EtcdConfig, *args: str) -> tuple[int, str, str]:
    """Run `ctl ARGS --etcd ... --etcd-prefix ...` as a subprocess; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *CTL, *args, "--etcd", ",".join(config.endpoints), "--etcd-prefix", config.prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def node_record(node_id: str, n_gpus: int = 2, *, draining: bool = False) -> NodeRecord:
    return NodeRecord(node_id=node_id, pool=True, draining=draining,
                      gpus=[Gpu(index=i, type="A100-80GB", memory_bytes=80 * GIB) for i in range(n_gpus)],
                      free_gpu_indices=list(range(n_gpus)))


async def seed(store: EtcdStore, keys: Keys, nodes: list[str], models: dict[str, int]) -> None:
    """Pool nodes with 2 GPUs each and models with min_replicas."""
    for n in nodes:
        await store.put(keys.node(n), node_record(n).SerializeToString())
    for name, min_replicas in models.items():
        spec = ModelSpec(name=name, engine="sim", weight_memory_bytes=10 * GIB, min_replicas=min_replicas)
        await store.put(keys.model(name), spec.SerializeToString())


async def desired(store: EtcdStore, keys: Keys) -> dict[str, Assignment]:
    kvs, _ = await store.list_prefix(keys.desired)
    return {kv.key[len(keys.desired):]: decode(Assignment, kv) for kv in kvs}


async def test_plan_then_apply_writes_desired_keys_and_a_replan_has_no_changes(
    etcd_config: EtcdConfig, store: EtcdStore, tmp_path: Path
) -> None:
    keys = Keys(etcd_config.prefix)
    await seed(store, keys, ["n1", "n2"], {"alpha": 2, "beta": 1})
    plan_path = tmp_path / "plan.json"
    code, out, err = await ctl(etcd_config, "plan", "--cluster", str(CLUSTER_FILE), "--out", str(plan_path),
                               "-o", "json")
    assert code == ExitCode.CHANGES, err
    shown = json.loads(out)  # stdout is exactly the JSON: no log lines mixed in
    pf = json.loads(plan_path.read_text())
    assert shown["plan_id"] == pf["plan_id"] and pf["computed_at_revision"] > 0
    starts = [a for a in pf["actions"] if a["kind"] == "START"]
    assert sorted(a["model"] for a in starts) == ["alpha", "alpha", "beta"]
    assert len({a["node_id"] for a in starts if a["model"] == "alpha"}) == 2   # min_replicas on distinct nodes
    assert await desired(store, keys) == {}                                      # planning writes nothing

    code, out, err = await ctl(etcd_config, "apply", str(plan_path))
    assert code == 0, err
    assert "3 started" in out
    got = await desired(store, keys)
    assert {(a.node_id, a.assignment_id, a.model, tuple(a.gpu_indices)) for a in got.values()} == {
        (a["node_id"], a["assignment_id"], a["model"], tuple(a["gpu_indices"])) for a in starts}
    assert all(a.plan_id == pf["plan_id"] and a.tensor_parallel == 1 for a in got.values())
    kv = await store.get(keys.current_plan)
    assert kv is not None
    record = decode(PlanRecord, kv)
    assert record.plan_id == pf["plan_id"] and record.computed_at_revision == pf["computed_at_revision"]
    assert record.applied_at_revision > record.computed_at_revision and "ctl apply" in record.applied_by
    assert json.loads(record.summary_json)["counts"] == {"START": 3}

    # current = desired: replanning keeps every assignment under its id (exit 0, no changes)
    code, out, err = await ctl(etcd_config, "plan", "--cluster", str(CLUSTER_FILE), "-o", "json")
    assert code == ExitCode.OK, err
    again = json.loads(out)
    assert {a["assignment_id"] for a in again["actions"] if a["kind"] == "KEEP"} == {a["assignment_id"] for a in starts}

    # applying the same (now stale) plan file again is refused: another apply happened since
    code, _, err = await ctl(etcd_config, "apply", str(plan_path))
    assert code == ExitCode.CONFLICT
    assert "stale" in err and "the current plan was created" in err and "desired assignments" in err


async def test_stale_plan_names_the_changed_node_and_writes_nothing(
    etcd_config: EtcdConfig, store: EtcdStore, tmp_path: Path
) -> None:
    keys = Keys(etcd_config.prefix)
    await seed(store, keys, ["n1"], {"alpha": 1})
    plan_path = tmp_path / "plan.json"
    code, _, err = await ctl(etcd_config, "plan", "--cluster", str(CLUSTER_FILE), "--out", str(plan_path))
    assert code == ExitCode.CHANGES, err
    # the node starts draining after planning: the START there must not happen
    rev_before = await store.put(keys.node("n1"), node_record("n1", draining=True).SerializeToString())
    code, _, err = await ctl(etcd_config, "apply", str(plan_path))
    assert code == ExitCode.CONFLICT
    assert "node n1 changed" in err and "nothing was written" in err
    assert await desired(store, keys) == {}
    assert await store.get(keys.current_plan) is None
    assert await store.revision() == rev_before

    # a plan replayed from a saved snapshot cannot be applied
    snap = tmp_path / "snap.yaml"
    code, _, err = await ctl(etcd_config, "plan", "--cluster", str(CLUSTER_FILE), "--save-snapshot", str(snap))
    assert code == ExitCode.OK, err   # draining node: nothing to start
    code, _, err = await ctl(etcd_config, "plan", "--snapshot", str(snap), "--out", str(plan_path))
    assert code == ExitCode.OK, err
    code, _, err = await ctl(etcd_config, "apply", str(plan_path))
    assert code == ExitCode.ERROR and "cannot be applied" in err


async def test_auto_approve_stops_assignments_of_a_removed_model(etcd_config: EtcdConfig, store: EtcdStore) -> None:
    keys = Keys(etcd_config.prefix)
    await seed(store, keys, ["n1", "n2"], {"alpha": 1, "beta": 1})
    code, out, err = await ctl(etcd_config, "apply", "--auto-approve", "--cluster", str(CLUSTER_FILE), "-o", "json")
    assert code == 0, err
    assert json.loads(out)["applied"]["started"] == 2
    assert sorted(a.model for a in (await desired(store, keys)).values()) == ["alpha", "beta"]
    await store.delete(keys.model("beta"))
    code, out, err = await ctl(etcd_config, "apply", "--auto-approve", "--cluster", str(CLUSTER_FILE), "-o", "json")
    assert code == 0, err
    assert json.loads(out)["applied"] == {"revision": json.loads(out)["applied"]["revision"], "started": 0,
                                          "stopped": 1, "kept": 1}
    assert [a.model for a in (await desired(store, keys)).values()] == ["alpha"]


# -- leader election ------------------------------------------------------------------------------


def daemon(store: EtcdStore, keys: Keys, name: str) -> PlannerDaemon:
    cfg = DaemonConfig(cluster=ClusterConfig.load(CLUSTER_FILE), identity=name, interval_s=0.2, lease_ttl=2,
                       time_limit_s=2.0)
    return PlannerDaemon(store, keys, cfg)


async def applied_by(store: EtcdStore, keys: Keys) -> str | None:
    kv = await store.get(keys.current_plan)
    return decode(PlanRecord, kv).applied_by if kv else None


async def test_only_the_leader_writes_and_a_lost_lease_hands_over(
    etcd_config: EtcdConfig, store: EtcdStore
) -> None:
    keys = Keys(etcd_config.prefix)
    await seed(store, keys, ["n1", "n2"], {"alpha": 1})
    a = daemon(store, keys, "planner-a")
    task_a = asyncio.create_task(a.run())
    await eventually(lambda: _true(a.is_leader), timeout=10, what="a leads")
    b = daemon(store, keys, "planner-b")
    task_b = asyncio.create_task(b.run())
    try:
        await eventually(lambda: applied_by(store, keys), timeout=10, what="a applied")
        assert await applied_by(store, keys) == "planner-a"
        await asyncio.sleep(1.0)  # several rounds of both
        assert not b.is_leader and b.stats.applied == 0 and b.stats.rounds == 0
        leader = await store.get(keys.planner_leader)
        assert leader is not None and leader.value == b"planner-a"
        old_fence = a.fence
        assert old_fence is not None

        # a's lease dies (as if its process stalled past the TTL): b takes over
        await store.client.lease.revoke(leader.lease)  # type: ignore[union-attr]
        await eventually(lambda: _true(b.is_leader), timeout=10, what="b leads")
        await seed(store, keys, [], {"gamma": 1})     # a change for the new leader to apply
        await eventually(lambda: _eq(applied_by(store, keys), "planner-b"), timeout=10, what="b applied")
        assert "gamma" in {x.model for x in (await desired(store, keys)).values()}

        # the deposed leader's fence no longer holds: its apply writes nothing
        await seed(store, keys, [], {"delta": 1})
        live = await plan_from_etcd(store, keys, ClusterConfig.load(CLUSTER_FILE), 0.0, time_limit_s=2)
        assert live.plan_file.changes
        with pytest.raises(StalePlan, match="leadership lost"):
            await apply_plan(store, keys, live.plan_file, "planner-a", fence=old_fence)
    finally:
        b.stop()
        a.stop()
        await asyncio.wait_for(asyncio.gather(task_a, task_b), 10)
    assert await store.get(keys.planner_leader) is None  # stopping revoked the leader's lease


async def _true(value: bool) -> bool:
    return value


async def _eq(value: object, expected: object) -> bool:
    return bool(await value == expected)  # type: ignore[misc]


# -- ctl profile ------------------------------------------------------------------------------------


async def test_profile_measures_a_sim_engine_near_its_configured_rate(tmp_path: Path) -> None:
    """The sim streams one token per 1/tokens_per_s after ttft_ms, at most max_concurrency at once, so a
    request of N tokens takes ttft + (N-1)/tokens_per_s and C workers finish C / that per second.
    (Whole milliseconds per token: event-loop timers round sub-millisecond parts.)"""
    tps, ttft_ms, conc, decode_tokens, prefill_tokens = 100.0, 5.0, 4, 40, 16
    sim = Sim("prof-model", tmp_path, "--tokens-per-s", str(tps), "--ttft-ms", str(ttft_ms))
    out = tmp_path / "cluster.yaml"
    out.write_text("gpu_types: {SIM-24GB: {price_per_hour: 0.1, relative_speed: 1.0}}\n"
                   "profiles:\n  - {model: prof-model, gpu_type: SIM-24GB, tp: 1, requests_per_s: 999}\n"
                   "  - {model: other, gpu_type: SIM-24GB, tp: 1, requests_per_s: 3}\n")
    try:
        proc = await asyncio.create_subprocess_exec(
            *CTL, "profile", "--url", sim.url, "--model", "prof-model", "--gpu-type", "SIM-24GB", "--tp", "1",
            "--concurrency", str(conc), "--duration", "3", "--decode-tokens", str(decode_tokens),
            "--out", str(out), "-o", "json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await proc.communicate()
    finally:
        sim.stop()
    assert proc.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    mixes = {m["mix"]: m for m in result["mixes"]}
    for name, tokens in (("prefill-heavy", prefill_tokens), ("decode-heavy", decode_tokens)):
        ideal_rps = conc / (ttft_ms / 1000 + (tokens - 1) / tps)
        m = mixes[name]
        assert m["errors"] == 0 and m["requests"] > conc
        assert 0.5 * ideal_rps <= m["requests_per_s"] <= 1.05 * ideal_rps, (name, m, ideal_rps)
        assert m["tokens_per_s"] == pytest.approx(m["requests_per_s"] * tokens, rel=0.01)
    expected = 2 / (1 / mixes["prefill-heavy"]["requests_per_s"] + 1 / mixes["decode-heavy"]["requests_per_s"])
    assert result["profile"]["requests_per_s"] == pytest.approx(expected, rel=1e-3)
    # merged: the old entry for the same (model, gpu_type, tp) is replaced, others and other keys kept
    written = ClusterConfig.load(out)
    assert [(p.model, p.requests_per_s) for p in written.profiles] == [
        ("other", 3.0), ("prof-model", result["profile"]["requests_per_s"])]
    assert "SIM-24GB" in written.gpu_types
