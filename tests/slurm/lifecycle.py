"""The serve-job lifecycle scenario, shared by the Slurm test and bench/slurm_lifecycle.py.

A gateway and a backup agent (outside Slurm) serve MODEL; ``ops/slurm/serve.sbatch`` adds a
second instance from a real Slurm job. Under a steady stream of streaming requests through the
gateway, the job is ended (``scancel``, or its time limit's pre-end USR1), and we measure:
sbatch → routable, end signal → records gone, and how many requests failed (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from controlplane.keys import Keys, decode
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store import EtcdStore
from controlplane.tenancy import DEFAULT_TENANT

REPO = Path(__file__).resolve().parents[2]
SERVE_TEMPLATE = REPO / "ops" / "slurm" / "serve.sbatch"
MODEL = "slurm-model"


@dataclass
class LoadResult:
    """What the load generator saw."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


async def steady_load(gateway: str, stop: asyncio.Event, result: LoadResult, workers: int = 4) -> None:
    """Streaming chat requests back to back from ``workers`` clients until ``stop``; every failure counted."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}

    async def worker(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.post(f"{gateway}/v1/chat/completions", json=body) as r:
                    data = await r.read()
                    if r.status == 200 and data.endswith(b"data: [DONE]\n\n"):
                        result.ok += 1
                        continue
                    result.failed += 1
                    result.errors.append(f"{r.status}: {data[-200:]!r}")
            except aiohttp.ClientError as exc:
                result.failed += 1
                result.errors.append(f"{type(exc).__name__}: {exc}")

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(workers)))


async def node_instances(store: EtcdStore, node_id: str) -> list[InstanceRecord]:
    """Instance records of ``node_id``."""
    kvs, _ = await store.list_prefix(Keys(store.prefix).tenant(DEFAULT_TENANT) + "instances/")
    return [r for r in (decode(InstanceRecord, kv) for kv in kvs) if r.node_id == node_id]


async def wait_routable(http: aiohttp.ClientSession, gateway: str, instances: int, timeout: float) -> None:
    """Wait until the gateway lists MODEL with ``instances`` READY instances."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(f"{gateway}/v1/models/{MODEL}") as r:
            if r.status == 200 and (await r.json())["instances"] == instances:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{MODEL} never had {instances} routable instances")


def serve_job_env(etcd: str, prefix: str, node_id: str, log_dir: Path) -> dict[str, str]:
    """The template's parameters for a sim-engine serve job."""
    return {
        "MODEL": MODEL, "ETCD": etcd, "ETCD_PREFIX": prefix, "ENGINE": "sim", "GPUS": "1xSIM-24GB",
        "NODE_ID": node_id, "LEASE_TTL": "5", "DRAIN_GRACE": "20", "LOG_DIR": str(log_dir),
        "SIM_OPTIONS": "ttft_ms=20 tokens_per_s=200", "CTL": str(Path(sys.executable).parent / "ctl"),
        # a 1-minute job: drain by the agent's clock 30 s before the end unless USR1 comes first
        "EXTRA_ARGS": "--drain-window 30",
    }


@dataclass
class LifecycleResult:
    """Numbers from one run of the scenario."""

    job_id: str
    sbatch_to_routable_s: float
    end_signal_to_records_gone_s: float
    requests_ok: int
    requests_failed: int
    requests_to_slurm_instance: float
    job_state: str
    errors: list[str]


async def run_lifecycle(cluster, store: EtcdStore, gateway: str, etcd: str, tmp: Path, *,  # type: ignore[no-untyped-def]
                        end_by: str = "scancel") -> LifecycleResult:
    """Submit the serve job, load it, end it (``scancel`` or ``timelimit``), measure."""
    node_id = f"slurm-{end_by}"
    env = serve_job_env(etcd, store.prefix, node_id, tmp / f"engine-logs-{end_by}")
    args: tuple[str, ...] = ("--time=1", "--signal=B:USR1@50") if end_by == "timelimit" else ()
    async with aiohttp.ClientSession() as http:
        submitted = time.monotonic()
        job_id = await asyncio.to_thread(cluster.sbatch, SERVE_TEMPLATE.read_text(), env, args)
        await wait_routable(http, gateway, 2, timeout=120)
        routable_s = time.monotonic() - submitted
        stop, load = asyncio.Event(), LoadResult()
        loader = asyncio.create_task(steady_load(gateway, stop, load))
        await asyncio.sleep(2.0)
        mine = await node_instances(store, node_id)
        served = await _served(http, mine[0].endpoint) if mine else 0.0
        if end_by == "scancel":
            ended = time.monotonic()
            await asyncio.to_thread(cluster.scancel, job_id)
        else:
            ended = await _wait_draining(store, node_id, timeout=90)
        node_key = Keys(store.prefix).for_tenant(DEFAULT_TENANT).node(node_id)
        while await node_instances(store, node_id) or await store.get(node_key):
            await asyncio.sleep(0.02)
        gone_s = time.monotonic() - ended
        await asyncio.sleep(1.0)  # keep the load on a little after: nothing may fail late either
        stop.set()
        await loader
        state = await asyncio.to_thread(cluster.wait_state, job_id, {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"},
                                        60.0)
    return LifecycleResult(job_id, routable_s, gone_s, load.ok, load.failed, served, state, load.errors[:5])


async def _served(http: aiohttp.ClientSession, endpoint: str) -> float:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(f"{endpoint}/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total"))
    return 0.0


async def _wait_draining(store: EtcdStore, node_id: str, timeout: float) -> float:
    """When the job's own pre-end signal made the instance DRAINING (monotonic time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.state == InstanceState.DRAINING for r in await node_instances(store, node_id)):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{node_id} never started draining")
