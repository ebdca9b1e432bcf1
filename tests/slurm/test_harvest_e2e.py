"""Harvesting on a real single-node Slurm whose node advertises typed GPUs (2x a100, 2x rtx4090).

    client ──▶ gateway: 503 + Retry-After (catalog model, no instance) ── demand/ record
    ctl harvest run ──▶ sbatch pool.sbatch --gres=gpu:rtx4090:1 (the cheapest type that fits)
        ──▶ agent joins (GPUS=1xRTX4090, ENGINE=sim) ──▶ ctl planner run places the model ──▶ 200
    sinfo fails (a PATH shim) ──▶ rounds fail, are logged with stderr and retried; nothing cancelled
    demand stops ──▶ the planner stops the replica ──▶ idle --idle-release-after ──▶ drain + scancel
    restart with a spent budget ──▶ demand again, no job; `ctl harvest status` says why

Everything runs as real processes (etcd, gateway, planner, harvester, the Slurm job's agent and
sim engine); intervals are short so the whole scenario stays around a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from slurmcluster import SlurmCluster, find_program

from controlplane.accounting.demand import demand_of
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import Demand, GatewayRecord, HarvestJob, HarvestJobState
from controlplane.procs import spawn
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, eventually, start_gateway, stop_all

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
MODEL = "harvest-m"
INTERVAL = 2.0
IDLE_RELEASE = 6.0
CLUSTER = {
    "gpu_types": {"A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
                  "RTX4090": {"price_per_hour": 1.0, "relative_speed": 1.0}},
    "reference_rps": {MODEL: 40.0},
    "horizon_s": 30,
}
SHIM = """#!/bin/sh
if [ -e "{flag}" ]; then
  echo "sinfo: error: slurm_load_partitions: Unable to contact slurm controller (connect failure)" >&2
  exit 1
fi
exec {sinfo} "$@"
"""


@dataclass
class Load:
    """A client sending chat requests back to back (bounded: 20 per second at most)."""

    url: str
    first_503: float = 0.0
    retry_after: str | None = None
    first_200: float = 0.0
    last_sent: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                self.last_sent = time.monotonic()
                try:
                    async with http.post(f"{self.url}/v1/chat/completions", json=body) as r:
                        await r.read()
                        self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                        if r.status == 503 and not self.first_503:
                            self.first_503, self.retry_after = time.monotonic(), r.headers.get("Retry-After")
                        if r.status == 200 and not self.first_200:
                            self.first_200 = time.monotonic()
                except aiohttp.ClientError:
                    self.statuses[0] = self.statuses.get(0, 0) + 1
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def load(url: str) -> AsyncIterator[Load]:
    stop, result = asyncio.Event(), Load(url)
    task = asyncio.create_task(result.run(stop))
    try:
        yield result
    finally:
        stop.set()
        await task


async def demand(store: EtcdStore, keys: Keys) -> list[Demand]:
    """The gateways' demand for MODEL, from their gateway records (what the harvester reads)."""
    kvs, _ = await store.list_prefix(keys.gateways)
    records = [decode(GatewayRecord, kv) for kv in kvs if not kv.key.endswith("/leader")]
    return [d for d in demand_of(records) if d.model == MODEL]


async def jobs(store: EtcdStore, keys: Keys) -> dict[str, HarvestJob]:
    kvs, _ = await store.list_prefix(keys.harvest_jobs)
    return {kv.key.rsplit("/", 1)[-1]: decode(HarvestJob, kv) for kv in kvs}


def harvester(tmp: Path, env: dict[str, str], ep: str, prefix: str, name: str, *extra: str):  # type: ignore[no-untyped-def]
    ctl = str(Path(sys.executable).parent / "ctl")
    argv = [*CTL, "harvest", "run", "--etcd", ep, "--etcd-prefix", prefix, "--cluster", str(tmp / "cluster.yaml"),
            "--partition", "debug", "--gres-type", "a100=A100-80GB", "--gres-type", "rtx4090=RTX4090",
            "--interval", str(INTERVAL), "--idle-release-after", str(IDLE_RELEASE), "--time", "5",
            "--drain-timeout", "10", "--start-latency", "10", "--lease-ttl", "4", "--declare-gpus",
            "--job-dir", str(tmp), "--sbatch-env", "ENGINE=sim", "--sbatch-env", f"CTL={ctl}",
            "--sbatch-env", "LEASE_TTL=4", "--sbatch-env", "DRAIN_GRACE=5", "--sbatch-env", "SIM_OPTIONS=ttft_ms=5",
            "--sbatch-env", f"LOG_DIR={tmp / 'engine-logs'}", "--id", name, *extra]
    return spawn(argv, tmp / f"{name}.log", env=env)


async def test_demand_acquires_the_cheapest_type_serves_then_gives_it_back_within_the_budget(
        slurm_cluster: SlurmCluster, etcd_server: EtcdProcess, etcd_prefix: str, tmp_path: Path) -> None:
    ep, prefix, keys = etcd_server.endpoint, etcd_prefix, Keys(etcd_prefix)
    tmp_path.chmod(0o755)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(CLUSTER))
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"models": [
        {"name": MODEL, "engine": "sim", "weight_memory_gib": 16, "kv_memory_gib": 2}]}))
    flag = tmp_path / "sinfo-fails"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sinfo").write_text(SHIM.format(flag=flag, sinfo=find_program("sinfo")))
    (shim / "sinfo").chmod(0o755)
    env = {**slurm_cluster.env, "PATH": f"{shim}:{os.environ['PATH']}"}
    procs = []
    store = await EtcdStore(EtcdConfig(endpoints=(ep,), prefix=prefix, timeout_s=3.0)).connect()
    try:
        gw, url = start_gateway(ep, prefix, tmp_path, "--no-auth", "--demand-interval", "0.5", "--demand-window", "5")
        procs.append(gw)
        applied = await asyncio.create_subprocess_exec(*CTL, "models", "apply", "-f", str(tmp_path / "catalog.yaml"),
                                                       "--etcd", ep, "--etcd-prefix", prefix)
        assert await applied.wait() == 0
        procs.append(spawn([*CTL, "planner", "run", "--etcd", ep, "--etcd-prefix", prefix, "--cluster",
                            str(tmp_path / "cluster.yaml"), "--interval", "1", "--lease-ttl", "4"],
                           tmp_path / "planner.log"))
        first = harvester(tmp_path, env, ep, prefix, "harvest-a")
        procs.append(first)

        # -- demand appears: 503 with Retry-After, a job of the cheapest sufficient type, served ----------
        async with load(url) as client:
            await eventually(lambda: _true(client.first_503 > 0), timeout=20, what="a first 503")
            assert client.retry_after is not None and int(client.retry_after) >= 1
            await eventually(lambda: demand(store, keys), timeout=10, what="demand record of a model without instance")
            submitted = await eventually(lambda: jobs(store, keys), timeout=3 * INTERVAL + 5, what="a harvest job")
            submit_s = time.monotonic() - client.first_503
            (job,) = submitted.values()
            assert (job.slurm_gres_type, job.gpu_type, job.gpu_count, list(job.models)) == (
                "rtx4090", "RTX4090", 1, [MODEL]), job
            await eventually(lambda: _true(client.first_200 > 0), timeout=60, interval=0.1, what="served")
            served_s = client.first_200 - client.first_503
            assert slurm_cluster.job_state(job.job_id) == "RUNNING"

            # -- sinfo fails: rounds fail and are retried, nothing is cancelled ---------------------------
            flag.touch()
            failing_since = time.monotonic()
            await asyncio.sleep(3 * INTERVAL)
            log_text = (tmp_path / "harvest-a.log").read_text()
            assert "Unable to contact slurm controller" in log_text and "slurm command failed" in log_text
            assert slurm_cluster.job_state(job.job_id) == "RUNNING"
            assert (await jobs(store, keys))[job.job_id].state == HarvestJobState.HARVEST_RUNNING
            status = await _status(ep, prefix)
            assert "sinfo" in status["last_error"], status
            flag.unlink()
            failed_for = time.monotonic() - failing_since
        demand_stopped = client.last_sent
        assert client.statuses.get(200, 0) > 5, client.statuses

        # -- demand stops: released after --idle-release-after, cancelled in Slurm -----------------------
        async def demand_gone() -> bool:
            return not await demand(store, keys)
        await eventually(demand_gone, timeout=20, what="demand record gone")
        demand_gone_at = time.monotonic()

        async def cancelled() -> bool:
            rec = (await jobs(store, keys))[job.job_id]
            return rec.state in (HarvestJobState.HARVEST_CANCELLED, HarvestJobState.HARVEST_ENDED)
        await eventually(cancelled, timeout=40, interval=0.2, what="the idle job given back")
        cancelled_s = time.monotonic() - demand_gone_at
        final = await asyncio.to_thread(slurm_cluster.wait_state, job.job_id, {"CANCELLED", "COMPLETED"}, 30)
        rec = (await jobs(store, keys))[job.job_id]
        assert "no assignment" in rec.end_reason, rec
        print(f"\nharvest e2e: first 503 -> job submitted {submit_s:.1f}s, -> served {served_s:.1f}s; "
              f"sinfo failing for {failed_for:.1f}s cancelled nothing; last request -> demand record gone "
              f"{demand_gone_at - demand_stopped:.1f}s, -> job given back {cancelled_s:.1f}s (Slurm: {final})")
        # from the first 503: demand publication + <= 2 rounds + job start + agent and engine start
        assert submit_s <= 2 * INTERVAL + 3.0, submit_s
        assert served_s <= 45, served_s
        # planner round (1 s) stops the replica, then --idle-release-after + 2 rounds (+ the drain round)
        assert cancelled_s <= 1 + IDLE_RELEASE + 3 * INTERVAL + 3, cancelled_s

        # -- a restart with a spent budget: demand again, no job, and status says why --------------------
        first.terminate()
        assert await asyncio.to_thread(first.wait, 15) == 0
        procs.append(harvester(tmp_path, env, ep, prefix, "harvest-b", "--budget-gpu-hours-per-day", "0.05"))
        async with load(url) as client:
            await asyncio.sleep(4 * INTERVAL)
            status = await _status(ep, prefix)
        assert list(await jobs(store, keys)) == [job.job_id], "a job was submitted past the budget"
        assert status["leader"] == "harvest-b" and status["budget"]["used_gpu_hours"] > 0, status
        assert any(n.startswith("budget exhausted") for n in status["notes"]), status
        table = await _ctl(ep, prefix, "harvest", "status")
        assert "budget exhausted" in table and job.job_id in table
    finally:
        await store.close()
        stop_all(procs)
    for name in ("harvest-a.log", "harvest-b.log", "planner.log"):
        text = (tmp_path / name).read_text()
        assert "Traceback" not in text, text[-3000:]


async def _true(value: bool) -> bool:
    return value


async def _ctl(ep: str, prefix: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(*CTL, *args, "--etcd", ep, "--etcd-prefix", prefix,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _status(ep: str, prefix: str) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(await _ctl(ep, prefix, "harvest", "status", "-o", "json")))
