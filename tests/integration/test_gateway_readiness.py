"""Truthful readiness: start-up gating, a hung etcd, every lease expiring at once, setup failures.

Each test has its own etcd process (it stops or hangs it), real sim engines and a gateway
in-process on a real port.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import ApiKey
from controlplane.store import EtcdConfig, EtcdStore
from gateway.app import Gateway, GatewayConfig
from gateway.auth import key_hash, new_api_key
from gateway.fleet import FleetSettings
from tests.cluster import Sim, eventually, gateway_in_process, instance_record

MODEL = "ready-model"


@pytest.fixture
def etcd() -> Iterator[EtcdProcess]:
    proc = EtcdProcess.in_temp_dir().start()
    yield proc
    if proc.proc is not None:
        proc.proc.send_signal(signal.SIGCONT)
    proc.stop()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    s = Sim(MODEL, tmp_path_factory.mktemp("ready"), "--ttft-ms", "2", "--tokens-per-s", "0")
    yield s
    s.stop()


@pytest.fixture
async def store(etcd: EtcdProcess) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix="/mp-ready", timeout_s=1.0)).connect()
    yield s
    await s.close()


def chat() -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with http.get(f"{url}/readyz") as r:
        return r.status, await r.json()


def config(store: EtcdStore, **kw: object) -> GatewayConfig:
    etcd = EtcdConfig(endpoints=store.config.endpoints, prefix=store.prefix, timeout_s=1.0)
    return GatewayConfig(etcd=etcd, fleet=FleetSettings(lease_ttl_s=3), **kw)  # type: ignore[arg-type]


async def test_api_routes_answer_503_until_keys_and_models_are_loaded(etcd: EtcdProcess, store: EtcdStore,
                                                                      sim: Sim) -> None:
    keys = Keys(store.prefix)
    key = new_api_key()
    await store.put(keys.api_key(key_hash(key)), ApiKey(key_id="k1", owner="ann").SerializeToString())
    rec = instance_record(MODEL, "r1", sim.url)
    await store.put(keys.instance(MODEL, "r1"), rec.SerializeToString())
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)          # the gateway starts while etcd does not answer
    auth = {"Authorization": f"Bearer {key}"}
    async with gateway_in_process(config(store)) as (gw, url), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=auth) as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "1", body   # not 401 for a valid key
            assert body["error"]["type"] == "service_unavailable" and "starting" in body["error"]["message"]
        async with http.get(f"{url}/v1/models", headers=auth) as r:
            assert r.status == 503
        status, ready = await readyz(http, url)
        assert status == 503 and ready["status"] == "starting"
        etcd.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: asyncio.sleep(0, gw.state_loaded), timeout=15, what="tables loaded")

        async def served() -> bool:
            async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=auth) as r:
                return r.status == 200
        await eventually(served, timeout=10, what="the valid key is served")
        async with http.post(f"{url}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401


async def test_a_hung_etcd_is_reported_within_5s_and_requests_keep_working(etcd: EtcdProcess, store: EtcdStore,
                                                                           sim: Sim) -> None:
    rec = instance_record(MODEL, "h1", sim.url)
    await store.put(Keys(store.prefix).instance(MODEL, "h1"), rec.SerializeToString())
    async with gateway_in_process(config(store, auth=False)) as (gw, url), aiohttp.ClientSession() as http:
        await eventually(lambda: asyncio.sleep(0, gw.etcd_connected and len(gw.table.ready(MODEL)) == 1),
                         what="loaded and connected")
        status, ready = await readyz(http, url)
        assert (status, ready["status"], ready["etcd"]) == (200, "ok", "connected"), ready
        assert etcd.proc is not None
        etcd.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()

        async def unreachable() -> bool:
            status, body = await readyz(http, url)
            return status == 200 and body["status"] == "degraded" and body["etcd"] == "unreachable"
        await eventually(unreachable, timeout=8, interval=0.05, what="readyz degraded")
        detected_s = time.monotonic() - stopped
        print(f"\nhung etcd detected after {detected_s:.2f}s")
        assert detected_s < 5.0
        async with http.get(f"{url}/metrics") as r:
            assert "modelpool_gateway_etcd_connected 0.0" in await r.text()
        async with http.post(f"{url}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200                   # fail static
        etcd.proc.send_signal(signal.SIGCONT)

        async def healthy() -> bool:
            status, body = await readyz(http, url)
            return status == 200 and body["status"] == "ok"
        await eventually(healthy, timeout=30, what="readyz ok again")
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert "modelpool_gateway_etcd_connected 1.0" in text
        assert 'modelpool_loop_up{loop="etcd-probe"} 1.0' in text
        assert 'modelpool_loop_failures_total{loop="etcd-probe"}' in text


async def test_when_every_lease_expires_at_once_the_model_stays_served(etcd: EtcdProcess, store: EtcdStore,
                                                                       sim: Sim) -> None:
    """etcd hangs longer than the lease TTL; on resume it expires the 'agent''s lease, and the agent
    re-registers a second later. Requests in that gap still get answers (never 404, never 503)."""
    keys = Keys(store.prefix)
    rec = instance_record(MODEL, "l1", sim.url).SerializeToString()
    lease = (await store.client.lease.grant(2)).ID  # type: ignore[union-attr]
    await store.put(keys.instance(MODEL, "l1"), rec, lease=lease)

    async def keep_alive() -> None:          # the agent's keepalives, until etcd hangs
        while True:
            call = store.client.lease.keep_alive(lease)  # type: ignore[union-attr]
            await call.read()
            call.cancel()
            await asyncio.sleep(0.5)

    keeper = asyncio.create_task(keep_alive())
    statuses: list[int] = []
    async with gateway_in_process(config(store, auth=False)) as (gw, url), aiohttp.ClientSession() as http:
        await eventually(lambda: asyncio.sleep(0, len(gw.table.ready(MODEL)) == 1), what="routable")
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                async with http.post(f"{url}/v1/chat/completions", json=chat()) as r:
                    await r.read()
                    statuses.append(r.status)
                await asyncio.sleep(0.01)

        loader = asyncio.create_task(load())
        assert etcd.proc is not None
        keeper.cancel()
        etcd.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(4.0)                 # > TTL: the lease expires the moment etcd resumes
        etcd.proc.send_signal(signal.SIGCONT)

        async def expired() -> bool:
            return await store.get(keys.instance(MODEL, "l1")) is None
        await eventually(expired, timeout=10, what="the lease expired")
        await eventually(lambda: asyncio.sleep(0, not any(e.state for e in gw.table.all())), what="table saw it")
        await asyncio.sleep(1.0)                 # the agent notices and re-grants (about TTL/3)
        new_lease = (await store.client.lease.grant(10)).ID  # type: ignore[union-attr]
        await store.put(keys.instance(MODEL, "l1"), rec, lease=new_lease)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(loader, 10)
    assert len(statuses) > 100
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


async def test_a_gateway_that_fails_during_setup_leaves_nothing_behind(store: EtcdStore, tmp_path: Path) -> None:
    before = set(asyncio.all_tasks())
    gw = Gateway(config(store, auth=False, worker_metrics_dir=str(tmp_path / "missing" / "dir"),
                        gateway_id="leaky"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with pytest.raises(OSError):
        await gw.start(sock)
    sock.close()
    await asyncio.sleep(0.1)
    left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert left == [], [t.get_name() for t in left]
    assert await store.get(Keys(store.prefix).gateway("leaky")) is None   # the lease was revoked
