"""A pool job preempted by Slurm drains within the grace time; the gateway routes elsewhere and
the planner places the replica it lost on another node (issue 16, item 4).

Slurm preempts with PreemptMode=CANCEL and a GraceTime by sending SIGCONT + SIGTERM to *every*
process of the job (checked on this 22.05 cluster with preempt/partition_prio: the batch shell
and its children, engines included), then SIGKILL after the grace. ``scancel --signal=TERM
--full`` sends exactly that signal to exactly those processes, without the ~25 s the
controller takes to decide a preemption, so the test uses it.

    gateway, planner, pool agents backup-1 (RTX4090) and later backup-2 (A100-80GB), outside Slurm
    pool.sbatch job (RTX4090): the model's min_replicas=2 go to the two RTX4090 nodes (cheapest)
    steady load ──▶ TERM to every process of the job ──▶ its instance DRAINING, records gone,
    job ends ──▶ the planner re-places the second replica on backup-2; no request failed
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from slurmcluster import FINAL_STATES, SlurmCluster

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.procs import spawn
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, eventually, start_gateway, stop_all

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
MODEL = "preempt-m"
DRAIN_GRACE = 5
CLUSTER = {"gpu_types": {"A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
                         "RTX4090": {"price_per_hour": 1.0, "relative_speed": 1.0}},
           "reference_rps": {MODEL: 40.0}, "horizon_s": 30}


async def ready_nodes(store: EtcdStore, keys: Keys) -> set[str]:
    kvs, _ = await store.list_prefix(keys.tenant("default") + "instances/")
    return {r.node_id for r in (decode(InstanceRecord, kv) for kv in kvs) if r.state == InstanceState.READY}


def pool_agent(ep: str, prefix: str, tmp: Path, node: str, gpus: str):  # type: ignore[no-untyped-def]
    return spawn([*CTL, "agent", "--etcd", ep, "--etcd-prefix", prefix, "--pool", "--engine", "sim", "--gpus", gpus,
                  "--node-id", node, "--lease-ttl", "4", "--drain-grace", str(DRAIN_GRACE), "--sim-option",
                  "ttft_ms=5", "--log-dir", str(tmp / "engines")], tmp / f"agent-{node}.log")


async def test_preempted_pool_job_drains_within_the_grace_and_its_replica_moves(
        slurm_cluster: SlurmCluster, etcd_server: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> None:
    ep, prefix, keys = etcd_server.endpoint, etcd_prefix, Keys(etcd_prefix)
    tmp_path.chmod(0o755)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"models": [
        {"name": MODEL, "engine": "sim", "weight_memory_gib": 16, "kv_memory_gib": 2, "min_replicas": 2}]}))
    procs = []
    store = await EtcdStore(EtcdConfig(endpoints=(ep,), prefix=prefix, timeout_s=3.0)).connect()
    try:
        gw, url = start_gateway(ep, prefix, tmp_path, "--no-auth")
        procs.append(gw)
        proc = await asyncio.create_subprocess_exec(*CTL, "models", "apply", "-f", str(tmp_path / "catalog.yaml"),
                                                    "--etcd", ep, "--etcd-prefix", prefix)
        assert await proc.wait() == 0
        procs.append(pool_agent(ep, prefix, tmp_path, "backup-1", "1xRTX4090"))
        job = await asyncio.to_thread(slurm_cluster.sbatch, (REPO / "ops/slurm/pool.sbatch").read_text(), {
            "ETCD": ep, "ETCD_PREFIX": prefix, "ENGINE": "sim", "GPUS": "1xRTX4090", "NODE_ID": "slurm-pool",
            "LEASE_TTL": "4", "DRAIN_GRACE": str(DRAIN_GRACE), "SIM_OPTIONS": "ttft_ms=5",
            "LOG_DIR": str(tmp_path / "engines"), "CTL": str(Path(sys.executable).parent / "ctl")},
            ("--gres=gpu:rtx4090:1", "--time=5"))
        await eventually(lambda: store.get(keys.for_tenant("default").node("slurm-pool")), timeout=30,
                         what="the Slurm job's agent")
        procs.append(spawn([*CTL, "planner", "run", "--etcd", ep, "--etcd-prefix", prefix, "--cluster",
                            str(tmp_path / "cluster.yaml"), "--interval", "1", "--lease-ttl", "4"],
                           tmp_path / "planner.log"))

        async def on(nodes: set[str]) -> bool:
            return await ready_nodes(store, keys) == nodes
        await eventually(lambda: on({"backup-1", "slurm-pool"}), timeout=40, interval=0.2, what="two replicas")
        procs.append(pool_agent(ep, prefix, tmp_path, "backup-2", "1xA100-80GB"))
        await eventually(lambda: store.get(keys.for_tenant("default").node("backup-2")), timeout=20,
                         what="backup-2 registered")

        stop, ok, failed, errors = asyncio.Event(), [0], [0], []

        async def client() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
                while not stop.is_set():
                    try:
                        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                            data = await r.read()
                            if r.status == 200 and data.endswith(b"data: [DONE]\n\n"):
                                ok[0] += 1
                                continue
                            failed[0] += 1
                            errors.append(f"{r.status} {data[-200:]!r}")
                    except aiohttp.ClientError as exc:
                        failed[0] += 1
                        errors.append(repr(exc))

        load = [asyncio.create_task(client()) for _ in range(3)]
        await asyncio.sleep(2.0)
        signalled = time.monotonic()
        await asyncio.to_thread(slurm_cluster._command, ["scancel", "--signal=TERM", "--full", job])

        async def gone() -> bool:
            left = "slurm-pool" not in await ready_nodes(store, keys)
            return left and await store.get(keys.for_tenant("default").node("slurm-pool")) is None
        await eventually(gone, timeout=DRAIN_GRACE + 10, interval=0.05, what="the preempted node's records gone")
        gone_s = time.monotonic() - signalled
        await eventually(lambda: on({"backup-1", "backup-2"}), timeout=20, interval=0.1, what="re-placed")
        replaced_s = time.monotonic() - signalled
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*load)
        state = await asyncio.to_thread(slurm_cluster.wait_state, job, FINAL_STATES, 30)
        print(f"\npreemption: TERM -> records gone {gone_s:.1f}s (grace {DRAIN_GRACE}s), -> re-placed "
              f"{replaced_s:.1f}s; requests ok {ok[0]}, failed {failed[0]}; job {state}")
        assert failed[0] == 0, errors[:5]
        assert ok[0] > 20
        assert gone_s <= DRAIN_GRACE + 3, gone_s
        assert state == "COMPLETED", state  # the agent drained and exited on its own, inside the grace
    finally:
        await store.close()
        stop_all(procs)
