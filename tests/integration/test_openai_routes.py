"""Every forwarded gateway route through the official `openai` client, with API keys on.

Real etcd, two real sim engine subprocesses of one model registered as READY instances, and a
gateway in-process (``build_app`` on a real TCP port) with auth on and a key created in etcd.
Each answer through the gateway is compared with what a sim answers directly to the same body:
the sims are deterministic (same flags, same seed), so only ids and timestamps may differ.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import ApiKey
from controlplane.store import EtcdConfig, EtcdStore
from gateway.app import FORWARDED_ROUTES, Gateway, GatewayConfig
from gateway.auth import key_hash, new_api_key
from tests.cluster import Sim, eventually, gateway_in_process, instance_record

MODEL = "routes-model"
EMBED_DIM = 16
VOLATILE = frozenset({"id", "created", "created_at", "item_id"})   # per-request ids and clocks


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    tmp: Path = tmp_path_factory.mktemp("routes")
    flags = ("--ttft-ms", "2", "--tokens-per-s", "0", "--embedding-dim", str(EMBED_DIM))
    started = [Sim(MODEL, tmp, *flags), Sim(MODEL, tmp, *flags)]
    yield started
    for s in started:
        s.stop()


class Env:
    """A gateway with auth on in front of the sims, and the clients to call both."""

    def __init__(self, url: str, key: str, sim: Sim) -> None:
        self.url, self.key, self.sim = url, key, sim
        self.via = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        self.direct = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
        self.direct_root = AsyncOpenAI(base_url=sim.url, api_key="unused", max_retries=0)

    async def close(self) -> None:
        for c in (self.via, self.direct, self.direct_root):
            await c.close()


@pytest.fixture
async def env(etcd_server: EtcdProcess, sims: list[Sim]) -> AsyncIterator[Env]:
    prefix = f"/mp-routes-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    for i, sim in enumerate(sims):
        rec = instance_record(MODEL, f"routes-{i}", sim.url)
        await store.put(keys.instance(MODEL, rec.instance_id), rec.SerializeToString())
    key = new_api_key()
    await store.put(keys.api_key(key_hash(key)), ApiKey(key_id=key_hash(key)[:8], owner="ann").SerializeToString())
    async with gateway_in_process(GatewayConfig(etcd=store.config, auth=True)) as (gw, url):
        e = Env(url, key, sims[0])
        try:
            await eventually(lambda: _ready(gw, len(sims)), what="routing table and keys loaded")
            yield e
        finally:
            await e.close()
    await store.close()


async def _ready(gw: Gateway, instances: int) -> bool:
    return gw.table.loaded and gw.access.loaded and gw.api_keys.loaded and len(gw.table.ready(MODEL)) == instances


def scrub(value: Any) -> Any:
    """``value`` (SDK models become dicts) without per-request ids and timestamps."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", warnings=False)  # base64 embeddings are str, not list
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


async def both(env: Env, call: str, **kwargs: Any) -> tuple[Any, Any]:
    """The same SDK call through the gateway and directly against a sim; streams are drained to lists."""
    answers = []
    for client in (env.via, env.direct):
        method: Any = client
        for name in call.split("."):
            method = getattr(method, name)
        answer = await method(**kwargs)
        if isinstance(answer, openai.AsyncStream):
            answer = [event async for event in answer]
        answers.append(answer)
    return answers[0], answers[1]


async def test_models_lists_the_model(env: Env) -> None:
    page = await env.via.models.list()
    (card,) = page.data
    assert card.id == MODEL and card.object == "model"
    assert card.model_dump()["instances"] == 2


async def test_wrong_key_is_authentication_error(env: Env) -> None:
    async with AsyncOpenAI(base_url=env.url + "/v1", api_key="mp-not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            await bad.post("/rerank", body={"model": MODEL, "query": "q", "documents": ["a"]}, cast_to=object)


async def test_chat_plain_and_streaming_with_and_without_usage(env: Env) -> None:
    base: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello pool"}], "max_tokens": 6}
    via, direct = await both(env, "chat.completions.create", **base)
    assert scrub(via) == scrub(direct)
    assert via.usage is not None and via.usage.completion_tokens == 6
    # no include_usage: the gateway asks the engine for usage and strips it again, invisibly
    via_s, direct_s = await both(env, "chat.completions.create", **base, stream=True)
    assert scrub(via_s) == scrub(direct_s)
    assert all(c.usage is None for c in via_s)
    assert "".join(c.choices[0].delta.content or "" for c in via_s if c.choices) == via.choices[0].message.content
    via_u, direct_u = await both(env, "chat.completions.create", **base, stream=True,
                                 stream_options={"include_usage": True})
    assert scrub(via_u) == scrub(direct_u)
    assert via_u[-1].choices == [] and via_u[-1].usage is not None and via_u[-1].usage.completion_tokens == 6


async def test_completions_plain_and_streaming(env: Env) -> None:
    base: dict[str, Any] = {"model": MODEL, "prompt": "one two three", "max_tokens": 5}
    via, direct = await both(env, "completions.create", **base)
    assert scrub(via) == scrub(direct) and via.choices[0].finish_reason == "length"
    via_s, direct_s = await both(env, "completions.create", **base, stream=True)
    assert scrub(via_s) == scrub(direct_s)
    assert "".join(c.choices[0].text for c in via_s if c.choices) == via.choices[0].text
    assert all(c.usage is None for c in via_s)


async def test_embeddings_float_and_base64(env: Env) -> None:
    base: dict[str, Any] = {"model": MODEL, "input": ["alpha beta", "gamma"]}
    via_f, direct_f = await both(env, "embeddings.create", **base, encoding_format="float")
    assert scrub(via_f) == scrub(direct_f)
    assert [len(d.embedding) for d in via_f.data] == [EMBED_DIM, EMBED_DIM]
    # explicit base64: the SDK hands the strings over as the engine sent them
    via_b, direct_b = await both(env, "embeddings.create", **base, encoding_format="base64")
    assert scrub(via_b) == scrub(direct_b)
    for item, floats in zip(via_b.data, via_f.data, strict=True):
        raw = item.embedding
        assert isinstance(raw, str)
        assert list(struct.unpack(f"<{EMBED_DIM}f", base64.b64decode(raw))) == pytest.approx(floats.embedding)
    # no encoding_format: the SDK asks for base64 and decodes it itself
    via_d, _ = await both(env, "embeddings.create", **base)
    for decoded, floats in zip(via_d.data, via_f.data, strict=True):
        assert decoded.embedding == pytest.approx(floats.embedding)


async def test_responses_plain_and_streaming(env: Env) -> None:
    base: dict[str, Any] = {"model": MODEL, "input": [{"role": "user", "content": "tell me about pools"}],
                            "instructions": "be brief", "max_output_tokens": 7}
    via, direct = await both(env, "responses.create", **base)
    assert scrub(via) == scrub(direct)
    assert via.id.startswith("resp_") and len(via.output_text.split()) == 7
    assert via.usage is not None and (via.usage.input_tokens, via.usage.output_tokens) == (6, 7)
    via_s, direct_s = await both(env, "responses.create", **base, stream=True)
    assert scrub(via_s) == scrub(direct_s)
    assert via_s[0].type == "response.created" and via_s[-1].type == "response.completed"
    assert "".join(e.delta for e in via_s if e.type == "response.output_text.delta") == via.output_text
    assert via_s[-1].response.usage is not None and via_s[-1].response.usage.total_tokens == 13


async def test_generic_post_rerank_score_tokenize_detokenize(env: Env) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "/v1/rerank": {"query": "pools of gpus", "documents": ["gpus join the pool", "pools of gpus", "queues"],
                       "top_n": 2},
        "/v1/score": {"text_1": "pools of gpus", "text_2": ["gpus join the pool", "queues"]},
        "/v1/tokenize": {"prompt": "count these four words"},
        "/v1/detokenize": {"tokens": [11, 22, 33]},
    }
    answers: dict[str, Any] = {}
    for route, body in bodies.items():
        via = await env.via.post(route.removeprefix("/v1"), body={"model": MODEL, **body}, cast_to=object)
        direct = await env.direct_root.post(FORWARDED_ROUTES[route], body={"model": MODEL, **body}, cast_to=object)
        assert scrub(via) == scrub(direct), route
        answers[route] = via
    rerank = answers["/v1/rerank"]["results"]
    assert rerank[0]["index"] == 1 and rerank[0]["relevance_score"] == 1.0 and len(rerank) == 2
    assert [d["object"] for d in answers["/v1/score"]["data"]] == ["score", "score"]
    assert answers["/v1/tokenize"]["count"] == 4
    assert len(answers["/v1/detokenize"]["prompt"].split()) == 3
    async with aiohttp.ClientSession() as http, http.get(env.url + "/metrics") as resp:
        text = await resp.text()
    for route in bodies:
        assert f'modelpool_gateway_requests_total{{model="{MODEL}",route="{route}",status="200"}} 1.0' in text, route


async def test_unknown_model_is_not_found_on_every_forwarded_route(env: Env) -> None:
    with pytest.raises(openai.NotFoundError):
        await env.via.responses.create(model="no-such-model", input="x")
    for route in ("/rerank", "/score", "/tokenize"):
        with pytest.raises(openai.NotFoundError):
            await env.via.post(route, body={"model": "no-such-model"}, cast_to=object)
