"""The gateway against real etcd, real sim engines and a real `ctl gateway` process.

Instance records are written by the test itself (no agent), so every routing situation can be
set up exactly. Each test uses its own model names; the gateway and engines are shared.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI, NotFoundError

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.netutil import free_port
from controlplane.pb import ApiKey, InstanceState
from controlplane.store import EtcdConfig, EtcdStore
from gateway.auth import key_hash, new_api_key
from tests.cluster import Sim, eventually, instance_record, start_gateway, stop_all


@pytest.fixture(scope="module")
def world(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("gw")
    prefix = f"/mp-gw-{uuid.uuid4().hex[:8]}"
    sims = [Sim("shared", tmp, "--ttft-ms", "5", "--tokens-per-s", "0") for _ in range(2)]
    slow = Sim("slow", tmp, "--ttft-ms", "5", "--tokens-per-s", "20")
    gw, url = start_gateway(etcd_server.endpoint, prefix, tmp, "--no-auth")
    yield {"prefix": prefix, "sims": sims, "slow": slow, "gateway": url, "endpoint": etcd_server.endpoint}
    stop_all([gw])
    for s in [*sims, slow]:
        s.stop()


@pytest.fixture
async def wstore(world: dict[str, object]) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore(EtcdConfig(endpoints=(str(world["endpoint"]),), prefix=str(world["prefix"]))).connect()
    yield s
    await s.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def register(store: EtcdStore, model: str, iid: str, url: str, state: int = InstanceState.READY) -> None:
    rec = instance_record(model, iid, url, state)
    await store.put(Keys(store.prefix).instance(model, iid), rec.SerializeToString())


async def routable(http: aiohttp.ClientSession, gw: str, model: str) -> bool:
    async with http.get(f"{gw}/v1/models/{model}") as r:
        return r.status == 200


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}


async def test_routes_by_model_and_lists_only_ready_models(world, wstore, http) -> None:
    gw, sims = world["gateway"], world["sims"]
    model = f"m-{uuid.uuid4().hex[:6]}"
    # the sim serves "shared"; the gateway forwards the body unchanged, so use a model the engine knows
    await register(wstore, "shared", f"a-{model}", sims[0].url)
    await register(wstore, model, f"b-{model}", sims[1].url, InstanceState.STARTING)
    await eventually(lambda: routable(http, gw, "shared"), what="shared routable")
    async with http.get(f"{gw}/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert "shared" in ids and model not in ids  # STARTING is not listed
    async with http.post(f"{gw}/v1/chat/completions", json=chat("shared")) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-Request-Id"]
    assert body["usage"]["completion_tokens"] == 4
    # a known model without READY instances: 503, not 404
    async with http.post(f"{gw}/v1/chat/completions", json=chat(model)) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "no_capacity"


async def test_errors_use_the_openai_envelope(world, http) -> None:
    gw = world["gateway"]
    cases = [
        (f"{gw}/v1/chat/completions", b"{not json", 400),
        (f"{gw}/v1/chat/completions", b"[1, 2]", 400),
        (f"{gw}/v1/chat/completions", b'{"messages": []}', 400),
        (f"{gw}/v1/chat/completions", orjson.dumps(chat("no-such-model")), 404),
        (f"{gw}/v1/does-not-exist", b"{}", 404),
    ]
    for url, data, status in cases:
        async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == status, (url, data, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
            assert body["error"]["message"]
    async with http.post(f"{gw}/v1/chat/completions", data=b"x" * (33 * 1024 * 1024)) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "payload_too_large"
    client = AsyncOpenAI(base_url=f"{gw}/v1", api_key="unused")
    with pytest.raises(NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


async def test_streams_unbuffered_and_unchanged(world, wstore, http) -> None:
    gw, slow = world["gateway"], world["slow"]
    await register(wstore, "slow", "slow-1", slow.url)
    await eventually(lambda: routable(http, gw, "slow"), what="slow routable")
    body = chat("slow", max_tokens=10, stream=True, stream_options={"include_usage": True})
    started = time.monotonic()
    arrivals: list[float] = []
    raw = b""
    async with http.post(f"{gw}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            arrivals.append(time.monotonic() - started)
            raw += chunk
    # 10 tokens at 20/s take ~0.45 s; the first bytes must arrive long before the end
    assert arrivals[0] < arrivals[-1] - 0.2, arrivals
    frames = [f for f in raw.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    events = [orjson.loads(f[len(b"data: "):]) for f in frames[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) == 10
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10


async def test_openai_client_streaming_through_gateway(world, wstore, http) -> None:
    gw, sims = world["gateway"], world["sims"]
    await register(wstore, "shared", "oa-1", sims[0].url)
    await eventually(lambda: routable(http, gw, "shared"), what="shared routable")
    client = AsyncOpenAI(base_url=f"{gw}/v1", api_key="unused")
    stream = await client.chat.completions.create(model="shared", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text and usage is not None and usage.completion_tokens == 6
    comp = await client.completions.create(model="shared", prompt="once upon", max_tokens=3)
    assert comp.choices[0].finish_reason == "length"
    emb = await client.embeddings.create(model="shared", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64


async def test_draining_instance_gets_no_new_requests(world, wstore, http) -> None:
    gw, sims = world["gateway"], world["sims"]
    model = "shared"
    keys = Keys(wstore.prefix)
    await wstore.delete(keys.instances, prefix=True)
    await register(wstore, model, "d-1", sims[0].url)
    await register(wstore, model, "d-2", sims[1].url, InstanceState.DRAINING)
    await eventually(lambda: routable(http, gw, model), what="routable")
    before = await _engine_requests(http, sims[1].url)
    for _ in range(20):
        async with http.post(f"{gw}/v1/chat/completions", json=chat(model)) as r:
            assert r.status == 200
    assert await _engine_requests(http, sims[1].url) == before


async def test_dead_instance_is_retried_and_ejected(world, wstore, http) -> None:
    gw, sims = world["gateway"], world["sims"]
    keys = Keys(wstore.prefix)
    await wstore.delete(keys.instances, prefix=True)
    await register(wstore, "shared", "dead-1", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    await register(wstore, "shared", "live-1", sims[0].url)
    await eventually(lambda: _ready_count(http, gw, "shared", 2), what="both instances in the table")
    statuses = []
    for _ in range(30):
        async with http.post(f"{gw}/v1/chat/completions", json=chat("shared")) as r:
            statuses.append(r.status)
    assert statuses == [200] * 30
    async with http.get(f"{gw}/metrics") as r:
        text = await r.text()
    assert 'modelpool_gateway_ejections_total{model="shared"}' in text
    assert "modelpool_gateway_retries_total " in text and "modelpool_gateway_retries_total 0.0" not in text


async def test_auth_keys_and_model_access(etcd_server: EtcdProcess, tmp_path: Path, world, http) -> None:
    prefix = f"/mp-auth-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    proc, gw = start_gateway(etcd_server.endpoint, prefix, tmp_path)
    try:
        keys = Keys(prefix)
        await register(store, "shared", "auth-1", world["sims"][0].url)
        full, limited, revoked = new_api_key(), new_api_key(), new_api_key()
        for key, rec in ((full, ApiKey(key_id="full", owner="ann")),
                         (limited, ApiKey(key_id="lim", owner="bob", allowed_models=["other"])),
                         (revoked, ApiKey(key_id="rev", owner="eve", revoked=True))):
            await store.put(keys.api_key(key_hash(key)), rec.SerializeToString())

        async def status(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with http.post(f"{gw}/v1/chat/completions", json=chat("shared"), headers=headers) as r:
                if r.status != 200:
                    assert "error" in await r.json()
                return r.status

        await eventually(lambda: _ok(status(full)), what="key accepted")
        assert await status(None) == 401
        assert await status("mp-wrong") == 401
        assert await status(revoked) == 401
        assert await status(limited) == 403
        async with http.get(f"{gw}/v1/models", headers={"Authorization": f"Bearer {limited}"}) as r:
            assert [m["id"] for m in (await r.json())["data"]] == []
        async with http.get(f"{gw}/v1/models") as r:
            assert r.status == 401
    finally:
        stop_all([proc])
        await store.close()


async def test_fail_static_when_etcd_goes_away(tmp_path: Path, world, http) -> None:
    etcd = EtcdProcess.in_temp_dir().start()
    prefix = "/mp-static"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix)).connect()
    proc, gw = start_gateway(etcd.endpoint, prefix, tmp_path, "--no-auth")
    try:
        await register(store, "shared", "static-1", world["sims"][0].url)
        await eventually(lambda: routable(http, gw, "shared"), what="routable")
        await store.close()
        etcd.kill()

        async def degraded() -> bool:
            async with http.get(f"{gw}/readyz") as r:
                body = await r.json()
                return r.status == 200 and body["status"] == "degraded" and body["etcd"] == "unreachable"

        await eventually(degraded, timeout=20, what="readyz degraded")
        async with http.post(f"{gw}/v1/chat/completions", json=chat("shared")) as r:
            assert r.status == 200  # still routing on the last table
        async with http.get(f"{gw}/metrics") as r:
            assert "modelpool_gateway_etcd_connected 0.0" in await r.text()
    finally:
        stop_all([proc])
        etcd.stop()


async def _ok(coro: object) -> bool:
    return await coro == 200  # type: ignore[misc]


async def _ready_count(http: aiohttp.ClientSession, gw: str, model: str, n: int) -> bool:
    async with http.get(f"{gw}/v1/models/{model}") as r:
        return r.status == 200 and (await r.json())["instances"] == n


async def _engine_requests(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))
