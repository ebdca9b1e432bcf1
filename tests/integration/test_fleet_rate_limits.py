"""Rate limits hold for the whole fleet (slow: the 60 s window is inherent, about 75 s in all).

Three `ctl gateway` processes, one with ``--workers 2`` (four fleet members), one sim engine, and
four keys at once, each asked for several times its limit for 65 s:

* rpm key on one gateway      ─▶ at least 0.9 x its limit in the first minute
* rpm key spread over all     ─▶ at most 1.1 x its limit in any 60 s window after the first second
* tpm key on one gateway      ─▶ at least 0.9 x
* tpm key spread over all     ─▶ at most 1.1 x

Counts are what the clients received: 200 answers and the tokens in their usage fields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import ApiKey
from controlplane.procs import stop
from controlplane.store import EtcdConfig, EtcdStore
from gateway.auth import key_hash, new_api_key
from tests.cluster import Sim, eventually, instance_record, start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RPM = 120
TPM = 3000
RUN_S = 65.0
RATE = 8.0          # requests per second each client asks for (4x the rpm limit)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    s = Sim("fleet-lim", tmp_path, "--ttft-ms", "1", "--tokens-per-s", "0")
    yield s
    s.stop()


def worst_window(events: list[tuple[float, int]], start_after: float) -> int:
    """The most (cost) in any 60 s window that starts at or after ``start_after``."""
    events = sorted(events)
    best = sum(c for t, c in events if start_after <= t < start_after + 60)
    for i, (t, _) in enumerate(events):
        if t >= start_after:
            best = max(best, sum(c for u, c in events[i:] if u < t + 60))
    return best


async def client(http: aiohttp.ClientSession, urls: list[str], secret: str, started: float,
                 out: list[tuple[float, int]]) -> None:
    """Ask ``RATE`` times a second for RUN_S, round-robin over ``urls``; record (time, tokens) of 200s."""
    body = {"model": "fleet-lim", "messages": [{"role": "user", "content": "limit me please"}], "max_tokens": 6}
    n = 0
    while (now := time.monotonic()) < started + RUN_S:
        url = urls[n % len(urls)]
        n += 1
        async with http.post(f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as r:
            raw = await r.read()
        if r.status == 200:
            out.append((time.monotonic() - started, int(orjson.loads(raw)["usage"]["total_tokens"])))
        else:
            assert r.status == 429, raw[:200]
        await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        del now


async def test_limits_hold_for_the_fleet_on_one_gateway_and_spread_over_all(etcd_server: EtcdProcess, sim: Sim,
                                                                             tmp_path: Path) -> None:
    prefix = f"/mp-flim-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    await store.put(keys.instance("fleet-lim", "i1"), instance_record("fleet-lim", "i1", sim.url).SerializeToString())
    secrets: dict[str, str] = {}
    for name, fields in (("rpm-one", {"requests_per_minute": RPM}), ("rpm-all", {"requests_per_minute": RPM}),
                         ("tpm-one", {"tokens_per_minute": TPM}), ("tpm-all", {"tokens_per_minute": TPM})):
        secret = new_api_key()
        rec = ApiKey(key_id=key_hash(secret)[:8], owner=name, **fields)  # type: ignore[arg-type]
        await store.put(keys.api_key(key_hash(secret)), rec.SerializeToString())
        secrets[name] = secret
    procs = []
    try:
        for extra in ((), (), ("--workers", "2")):
            procs.append(start_gateway(etcd_server.endpoint, prefix, tmp_path, *extra))
        urls = [url for _, url in procs]
        await eventually(lambda: _members(store, keys, 4), timeout=30, what="four fleet members")
        # every gateway process has loaded the keys (new connections reach both workers)
        connector = aiohttp.TCPConnector(force_close=True, limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            for url in urls:
                for _ in range(4):
                    await eventually(lambda u=url: _loaded(http, u, secrets["rpm-one"]), timeout=20,  # type: ignore[misc]
                                     what="keys loaded")
            results: dict[str, list[tuple[float, int]]] = {name: [] for name in secrets}
            started = time.monotonic()
            await asyncio.gather(*(client(http, [urls[0]] if name.endswith("one") else urls, secrets[name], started,
                                          results[name]) for name in secrets))
    finally:
        for proc, _ in procs:
            stop(proc, timeout=20)
        await store.close()
    one_rpm = sum(1 for t, _ in results["rpm-one"] if t < 60)
    all_rpm = worst_window([(t, 1) for t, _ in results["rpm-all"]], 1.0)
    one_tpm = sum(c for t, c in results["tpm-one"] if t < 60)
    all_tpm = worst_window(results["tpm-all"], 1.0)
    print(f"rpm one gateway {one_rpm / RPM:.3f}x, spread max window {all_rpm / RPM:.3f}x; "
          f"tpm one gateway {one_tpm / TPM:.3f}x, spread max window {all_tpm / TPM:.3f}x")
    assert one_rpm >= 0.9 * RPM
    assert all_rpm <= 1.1 * RPM
    assert one_tpm >= 0.9 * TPM
    assert all_tpm <= 1.1 * TPM


async def _members(store: EtcdStore, keys: Keys, n: int) -> bool:
    return len((await store.list_prefix(keys.gateways))[0]) == n


async def _loaded(http: aiohttp.ClientSession, url: str, secret: str) -> bool:
    async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status == 200
