"""Gateway limits, usage, demand, fleet and private models against a real etcd and real sim engines.

Gateways run in-process (``gateway_in_process`` on a real TCP port) so their lease and write intervals
can be short; sims are real subprocesses; `ctl usage` runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from controlplane.accounting.blocks import Counts
from controlplane.accounting.report import read_usage
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import ApiKey, GatewayRecord, ModelAccess, ModelSpec
from controlplane.store import EtcdConfig, EtcdStore
from gateway.app import Gateway, GatewayConfig
from gateway.auth import key_hash, new_api_key
from gateway.fleet import FleetSettings
from tests.cluster import Sim, eventually, gateway_in_process, instance_record

FAST = FleetSettings(lease_ttl_s=4, publish_interval_s=0.2, usage_flush_s=0.2)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    tmp = tmp_path_factory.mktemp("gwlim")
    started = {"lim": Sim("lim", tmp, "--ttft-ms", "2", "--tokens-per-s", "0"),
               "secret": Sim("secret", tmp, "--ttft-ms", "2", "--tokens-per-s", "0")}
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture
async def env(etcd_server: EtcdProcess, sims: dict[str, Sim]) -> AsyncIterator[tuple[EtcdStore, Keys]]:
    prefix = f"/mp-lim-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    for name, sim in sims.items():
        rec = instance_record(name, f"{name}-1", sim.url)
        await store.put(keys.instance(name, f"{name}-1"), rec.SerializeToString())
    yield store, keys
    await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:   # a hang fails, named
        yield s


@asynccontextmanager
async def gateway(store: EtcdStore, *, auth: bool = True) -> AsyncIterator[tuple[Gateway, str]]:
    """One gateway on a free loopback port, until the block ends (then its lease is revoked)."""
    async with gateway_in_process(GatewayConfig(etcd=store.config, auth=auth, fleet=FAST)) as (gw, url):
        await eventually(lambda: _ready(gw), what="routing table loaded")
        yield gw, url


async def _ready(gw: Gateway) -> bool:
    return gw.table.loaded and gw.access.loaded and (gw.api_keys.loaded or not gw.config.auth) and len(gw.table) > 0


async def add_key(store: EtcdStore, keys: Keys, **fields: object) -> tuple[str, ApiKey]:
    key = new_api_key()
    rec = ApiKey(key_id=key_hash(key)[:8], **fields)  # type: ignore[arg-type]
    await store.put(keys.api_key(key_hash(key)), rec.SerializeToString())
    return key, rec


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5, **extra}


async def post(http: aiohttp.ClientSession, url: str, key: str | None, body: dict[str, object],
               headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers={**hdrs, **(headers or {})}) as r:
        return r.status, r.headers.copy(), await r.read()


async def key_known(http: aiohttp.ClientSession, url: str, key: str) -> bool:
    async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status == 200


async def usage_of(store: EtcdStore, keys: Keys, key_id: str) -> Counts:
    """The key's usage as `ctl usage` reads it (every record, every gateway)."""
    read = await read_usage(store, keys)
    assert not read.undecodable
    total = Counts()
    for e in read.entries:
        if e.key_id == key_id:
            total.add(e.counts)
    return total


async def test_rpm_limit_answers_429_with_retry_after(env, http) -> None:
    store, keys = env
    key, rec = await add_key(store, keys, owner="ann", requests_per_minute=4)
    async with gateway(store) as (_, url):
        await eventually(lambda: key_known(http, url, key), what="key loaded")
        results = [await post(http, url, key, chat("lim")) for _ in range(5)]
        assert [s for s, _, _ in results] == [200, 200, 200, 200, 429]
        _, ok_headers, _ = results[0]
        assert ok_headers["x-ratelimit-limit-requests"] == "4"
        assert ok_headers["x-ratelimit-remaining-requests"] == "3"
        _, headers, body = results[-1]
        assert headers["Retry-After"] in ("60", "61")        # the first request leaves the window a minute later
        assert headers["x-ratelimit-remaining-requests"] == "0"
        err = orjson.loads(body)["error"]
        assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'modelpool_gateway_requests_total{model="lim",route="/v1/chat/completions",status="429"} 1.0' in text
        assert 'modelpool_gateway_rate_limited_total{kind="requests"} 1.0' in text
        # the 429 is booked as an error in usage; the four answers carry their tokens
        got = await eventually(lambda: _usage_of(store, keys, rec.key_id, 5), what="usage flushed")
        assert got.errors == 1 and got.completion_tokens == 4 * 5


async def _usage_of(store: EtcdStore, keys: Keys, key_id: str, requests: int) -> Counts | None:
    got = await usage_of(store, keys, key_id)
    return got if got.requests == requests else None


async def test_tpm_limit_denies_after_the_bucket_goes_negative(env, http) -> None:
    store, keys = env
    key, _ = await add_key(store, keys, owner="ann", tokens_per_minute=20)
    async with gateway(store) as (_, url):
        await eventually(lambda: key_known(http, url, key), what="key loaded")
        status, headers, body = await post(http, url, key, chat("lim", max_tokens=30))
        assert status == 200 and headers["x-ratelimit-limit-tokens"] == "20"
        used = orjson.loads(body)["usage"]["total_tokens"]
        assert used > 20
        status, headers, body = await post(http, url, key, chat("lim"))
        assert status == 429
        assert orjson.loads(body)["error"]["type"] == "tokens"
        # the overdraft leaves the window with the request's second, a minute later
        assert int(headers["Retry-After"]) in (60, 61)


async def test_a_key_on_one_gateway_gets_its_whole_limit_and_the_other_gateway_none(env, http, etcd_server) -> None:
    store, keys = env
    key, rec = await add_key(store, keys, owner="bob", requests_per_minute=10)
    async with gateway(store) as (gw1, url1), gateway(store) as (gw2, url2):
        await eventually(lambda: _fleet_of(gw1, gw2, 2), what="both gateways see a fleet of 2")
        for url in (url1, url2):
            await eventually(lambda u=url: key_known(http, u, key), what="key loaded")  # type: ignore[misc]
        # alone on gw1: 1/2 of the limit until gw1 has published its demand, then all of it, never more
        sent = admitted = 0
        for _ in range(100):
            status = (await post(http, url1, key, chat("lim")))[0]
            sent += 1
            admitted += status == 200
            if admitted == 10:
                break
            await asyncio.sleep(0.1)
        assert admitted == 10
        for _ in range(3):
            assert (await post(http, url1, key, chat("lim")))[0] == 429
            sent += 1
        # gw2 learns that gw1 used the whole minute: it admits nothing
        await eventually(lambda: _peers_used(gw2, rec.key_id, 10), what="gw2 sees gw1's admissions")
        for _ in range(3):
            status, headers, _ = await post(http, url2, key, chat("lim"))
            assert status == 429 and headers["x-ratelimit-remaining-requests"] == "0"
            sent += 1
        async with http.get(f"{url1}/metrics") as r:
            assert "modelpool_gateway_fleet_size 2.0" in await r.text()
        await eventually(lambda: _usage_of(store, keys, rec.key_id, sent), what="usage of both gateways")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli.main", "usage", "--etcd", etcd_server.endpoint,
        "--etcd-prefix", store.prefix, "--owner", "bob", "-o", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    (row,) = orjson.loads(out)
    assert row["key_id"] == rec.key_id and row["owner"] == "bob" and row["model"] == "lim"
    assert (row["requests"], row["errors"]) == (sent, sent - 10)
    assert row["completion_tokens"] == 10 * 5 and row["prompt_tokens"] > 0


async def _fleet_of(a: Gateway, b: Gateway, n: int) -> bool:
    return a.limiter.fleet_size == n and b.limiter.fleet_size == n


async def _peers_used(gw: Gateway, key_id: str, n: int) -> bool:
    peer = gw.limiter._peers.get(key_id)
    return peer is not None and peer.admitted_requests >= n


async def test_demand_is_published_in_the_gateway_record_on_its_lease(env, http) -> None:
    store, keys = env
    async with gateway(store, auth=False) as (gw, url):
        for _ in range(3):
            assert (await post(http, url, None, chat("lim")))[0] == 200

        async def demand() -> GatewayRecord | None:
            kv = await store.get(keys.gateway(gw.config.gateway_id))
            rec = decode(GatewayRecord, kv) if kv is not None else None
            return rec if rec is not None and rec.demand else None

        rec = await eventually(demand, what="demand in the gateway record")
        (d,) = rec.demand
        assert d.model == "lim" and d.requests_per_second > 0 and d.completion_tokens_per_second > 0
        assert d.window_seconds == 60 and rec.usage_writer == gw.usage.writer
        assert kv_lease(await store.get(keys.gateway(gw.config.gateway_id))) != 0
        assert await store.get(keys.demand_entry("lim", gw.config.gateway_id)) is None   # no per-model records
    assert await store.get(keys.gateway(gw.config.gateway_id)) is None


async def test_gateway_reregisters_after_losing_its_lease(env) -> None:
    store, keys = env
    async with gateway(store, auth=False) as (gw, _):
        assert gw.fleet is not None
        first = await gw.fleet.session.wait_alive(5)
        await eventually(lambda: store.get(keys.gateway(gw.config.gateway_id)), what="registered")
        await store.client.lease.revoke(first)           # as if etcd had expired it
        assert await store.get(keys.gateway(gw.config.gateway_id)) is None

        async def registered_again() -> bool:
            kv = await store.get(keys.gateway(gw.config.gateway_id))
            return kv is not None and kv.lease != first

        await eventually(registered_again, timeout=10, what="registered on a new lease")


def kv_lease(kv: object) -> int:
    return int(getattr(kv, "lease", 0))


async def test_private_model_is_hidden_from_other_owners(env, http) -> None:
    store, keys = env
    spec = ModelSpec(name="secret", engine="sim", access=ModelAccess(public=False, allowed_owners=["ann"]))
    await store.put(keys.model("secret"), spec.SerializeToString())
    ann, _ = await add_key(store, keys, owner="ann")
    bob, _ = await add_key(store, keys, owner="bob")
    root, _ = await add_key(store, keys, owner="ops", admin=True)
    async with gateway(store) as (_, url):
        await eventually(lambda: key_known(http, url, bob), what="keys loaded")

        async def listed(key: str) -> list[str]:
            async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                return sorted(m["id"] for m in (await r.json())["data"])

        assert await listed(ann) == ["lim", "secret"]
        assert await listed(root) == ["lim", "secret"]
        assert await listed(bob) == ["lim"]
        status, _, body = await post(http, url, bob, chat("secret"))
        unknown_status, _, unknown_body = await post(http, url, bob, chat("no-such-model"))
        assert status == unknown_status == 404
        assert orjson.loads(body)["error"] == {
            **orjson.loads(unknown_body)["error"],
            "message": orjson.loads(unknown_body)["error"]["message"].replace("no-such-model", "secret")}
        async with http.get(f"{url}/v1/models/secret", headers={"Authorization": f"Bearer {bob}"}) as r:
            assert r.status == 404
        assert (await post(http, url, ann, chat("secret")))[0] == 200


_VOLATILE = re.compile(rb'"(id|created)": ("[^"]*"|\d+)')


async def test_stream_through_gateway_is_byte_identical_and_usage_is_learned(env, http, sims) -> None:
    store, keys = env
    body = chat("lim", max_tokens=7, stream=True)              # no stream_options: the client wants no usage
    async with gateway(store, auth=False) as (_, url):
        async with http.post(f"{sims['lim'].url}/v1/chat/completions", json=body) as r:
            direct = await r.read()
        status, headers, via = await post(http, url, None, body, headers={"X-Request-Id": "req-abc"})
        assert status == 200 and headers["X-Request-Id"] == "req-abc"
        assert b'"usage"' not in direct
        assert _VOLATILE.sub(b"", via) == _VOLATILE.sub(b"", direct)
        # asked for usage explicitly: passed through untouched, usage event included
        with_usage = chat("lim", max_tokens=7, stream=True, stream_options={"include_usage": True})
        async with http.post(f"{sims['lim'].url}/v1/chat/completions", json=with_usage) as r:
            direct_u = await r.read()
        _, _, via_u = await post(http, url, None, with_usage)
        assert b'"usage"' in via_u and _VOLATILE.sub(b"", via_u) == _VOLATILE.sub(b"", direct_u)
        # the gateway learned the usage of both streams all the same
        got = await eventually(lambda: _usage_of(store, keys, "anonymous", 2), what="usage flushed")
        assert got.completion_tokens == 14 and got.prompt_tokens > 0
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'modelpool_gateway_time_to_first_token_seconds_count{model="lim"} 2.0' in text
        assert 'modelpool_gateway_inter_token_latency_seconds_count{model="lim"} 12.0' in text
        assert 'modelpool_gateway_tokens_total{kind="completion",model="lim"} 14.0' in text


def test_ctl_usage_is_registered(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "controlplane.cli.main", "--help"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert "usage" in out.stdout
