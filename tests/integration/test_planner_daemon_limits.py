"""The planner daemon never livelocks on plans larger than one etcd transaction, and never dies."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.keys import Keys, decode
from controlplane.pb import Assignment
from controlplane.planner import daemon as daemon_mod
from controlplane.planner.daemon import DaemonConfig, PlannerDaemon
from controlplane.planner.live import ClusterConfig
from controlplane.store import EtcdStore
from tests.cluster import eventually
from tests.integration.test_plan_apply import CLUSTER_FILE, node_record, seed

NODES = [f"big-{i:03d}" for i in range(70)]


def planner(store: EtcdStore, name: str = "planner-big") -> PlannerDaemon:
    cfg = DaemonConfig(cluster=ClusterConfig.load(CLUSTER_FILE), identity=name, interval_s=0.3, lease_ttl=3,
                       time_limit_s=5.0, max_backoff_s=1.0)
    return PlannerDaemon(store, Keys(store.prefix), cfg)


async def assignments(store: EtcdStore) -> list[Assignment]:
    kvs, _ = await store.list_prefix(Keys(store.prefix).desired)
    return [decode(Assignment, kv) for kv in kvs]


async def test_a_plan_larger_than_one_transaction_is_applied_over_several_rounds(store: EtcdStore) -> None:
    keys = Keys(store.prefix)
    # two models that each want a replica on 70 nodes: 140 STARTs, more than one transaction holds
    await seed(store, keys, NODES, {"wide-a": 70, "wide-b": 70})
    d = planner(store)
    task = asyncio.create_task(d.run())
    try:
        async def placed() -> bool:
            return len(await assignments(store)) == 140
        await eventually(placed, timeout=60, interval=0.2, what="140 assignments placed")
        assert d.stats.applied >= 2 and d.stats.errors == 0, d.stats

        # every node drains: 140 forced STOPs, again more than one transaction
        applied = d.stats.applied  # before the first drain: a round may apply STOPs while the rest are written
        for n in NODES:
            rec = node_record(n)
            rec.draining = True
            await store.put(keys.node(n), rec.SerializeToString())

        async def emptied() -> bool:
            return not await assignments(store)
        await eventually(emptied, timeout=60, interval=0.2, what="every assignment stopped")
        assert d.stats.applied - applied >= 2 and d.stats.errors == 0, d.stats
    finally:
        d.stop()
        await asyncio.wait_for(task, 15)


async def test_the_daemon_survives_any_exception_in_a_round(store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = Keys(store.prefix)
    await seed(store, keys, ["n1"], {"alpha": 1})
    real = daemon_mod.plan_from_etcd
    failures = 0

    async def flaky(*args, **kw):  # type: ignore[no-untyped-def]
        nonlocal failures
        if failures < 3:
            failures += 1
            raise KeyError("a bug nobody listed")   # not a StoreError/PlanningError/…: it used to end the daemon
        return await real(*args, **kw)

    monkeypatch.setattr(daemon_mod, "plan_from_etcd", flaky)
    d = planner(store, "planner-flaky")
    task = asyncio.create_task(d.run())
    try:
        async def placed() -> bool:
            return len(await assignments(store)) == 1
        await eventually(placed, timeout=30, what="applied after the failures")
        assert failures == 3 and d.stats.errors == 3 and "a bug nobody listed" in d.stats.last_error
        assert not task.done()
    finally:
        d.stop()
        await asyncio.wait_for(task, 15)


