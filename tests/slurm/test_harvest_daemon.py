"""Two harvesters on one pool, real etcd and real Slurm: only the leader submits; a new leader
adopts what the old one submitted (no second job for the same demand); a deposed leader's
fenced writes are dropped."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from slurmcluster import SlurmCluster

from controlplane.etcdproc import EtcdProcess
from controlplane.harvest.daemon import HarvestDaemon, HarvestDaemonConfig, JobTemplate, job_name
from controlplane.harvest.model import HarvestSettings
from controlplane.harvest.slurm import Slurm
from controlplane.keys import Keys, decode
from controlplane.pb import HarvestJob, ModelSpec
from controlplane.planner.live import ClusterConfig
from controlplane.store import EtcdConfig, EtcdStore, Op
from tests.cluster import eventually

pytestmark = pytest.mark.slurm

CLUSTER = ClusterConfig.model_validate({
    "gpu_types": {"A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
                  "RTX4090": {"price_per_hour": 1.0, "relative_speed": 1.0}},
    "reference_rps": {"d-m": 10.0}, "horizon_s": 30})


async def test_only_the_leader_submits_and_a_new_leader_adopts(slurm_cluster: SlurmCluster,
                                                               etcd_server: EtcdProcess, tmp_path: Path) -> None:
    prefix = f"/mp-hd-{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix, timeout_s=3.0)).connect()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nsleep 120\n")
    tmp_path.chmod(0o755)
    await store.put(keys.model("d-m"), ModelSpec(name="d-m", engine="sim", weight_memory_bytes=16 << 30)
                    .SerializeToString())
    settings = HarvestSettings(partitions=("debug",), gres_types={"a100": "A100-80GB", "rtx4090": "RTX4090"},
                               gpu_memory_gib={"A100-80GB": 80.0, "RTX4090": 24.0}, interval_s=0.5,
                               time_limit_s=300, join_timeout_s=600, pending_timeout_s=600, job_name=job_name(prefix))
    template = JobTemplate(script=script, etcd_endpoints=etcd_server.endpoint, etcd_prefix=prefix, job_dir=tmp_path)
    base = HarvestDaemonConfig(settings=settings, cluster=CLUSTER, template=template, identity="a", lease_ttl=2,
                               demand_override={"d-m": 5.0})
    slurm = Slurm(slurm_cluster.env)
    a = HarvestDaemon(store, keys, base, slurm)
    b = HarvestDaemon(store, keys, replace(base, identity="b"), slurm)
    task_a = asyncio.create_task(a.run())
    try:
        await eventually(lambda: _true(a.leadership.is_leader and bool(a.stats.submitted)), timeout=15,
                         what="a leads and submits")
        task_b = asyncio.create_task(b.run())
        await asyncio.sleep(2.0)  # several rounds of both
        assert not b.leadership.is_leader and b.stats.submitted == [] and b.stats.rounds == 0
        assert a.stats.submitted == [a.stats.submitted[0]], "a submitted twice for the same demand"
        job_id = a.stats.submitted[0]
        old_fence = a.leadership.fence
        assert old_fence is not None

        # a's lease dies: b leads, adopts a's job (in flight: no second submission)
        leader = await store.get(keys.harvest_leader)
        assert leader is not None
        await store.client.lease.revoke(leader.lease)  # type: ignore[union-attr]
        await eventually(lambda: _true(b.leadership.is_leader), timeout=10, what="b leads")
        await eventually(lambda: _true(b.stats.rounds >= 3), timeout=10, what="b's rounds")
        assert b.stats.submitted == []
        listed = slurm_cluster._command(["squeue", "-h", "-n", settings.job_name, "-o", "%i"]).split()
        assert listed == [job_id]
        kv = await store.get(keys.harvest_job(job_id))
        assert kv is not None and decode(HarvestJob, kv).gpu_type == "RTX4090"

        # the deposed leader's fence no longer holds: its write is dropped
        ok, _ = await store.txn(old_fence.cmps(), [Op.put(keys.harvest_job("bogus"), b"x")])
        assert not ok and await store.get(keys.harvest_job("bogus")) is None
        b.stop()
        await asyncio.wait_for(task_b, 10)
    finally:
        a.stop()
        b.stop()
        await asyncio.wait_for(task_a, 10)
        slurm_cluster._command(["scancel", "-n", settings.job_name], check=False)
        await store.close()
    assert await store_is_clean(etcd_server, keys)


async def store_is_clean(etcd: EtcdProcess, keys: Keys) -> bool:
    """Stopping revoked the leader lease: no leader key, no status key."""
    store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=keys.prefix)).connect()
    try:
        return await store.get(keys.harvest_leader) is None and await store.get(keys.harvest_status) is None
    finally:
        await store.close()


async def _true(value: bool) -> bool:
    return value
