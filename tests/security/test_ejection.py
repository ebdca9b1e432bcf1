"""Attack 7 (steerable ejection): a body that makes engines fail must not eject healthy instances.

Before: a body that made engines answer 500 (1,000-deep JSON nesting: the sim's json parser
overflows, orjson in the gateway does not) got every healthy instance ejected at once and cost
the engines three attempts. Now such nesting is a 400 at the gateway (--max-json-depth), and in
general a 5xx is retried once: when the second instance fails the same body too, the body is the
cause, nothing is ejected and nothing is retried further. Ejection still happens for an instance
that fails requests the others answer.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.security.edge import ScriptedEngine, World, metric

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'
_FAIL_BODY = b'{"error":{"message":"the engine choked on this body","type":"InternalServerError","param":null,' \
    b'"code":500}}'
FAIL = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(_FAIL_BODY), _FAIL_BODY))


def answer(body: bytes) -> bytes:
    """A healthy engine that fails every request whose body holds "poison"."""
    return FAIL if b"poison" in body else OK


def post(world: World, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {world.keys['ann']}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def scrape(world: World) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def chat(model: str, text: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2})


@pytest.fixture
async def three(world: World) -> AsyncIterator[tuple[str, list[ScriptedEngine]]]:
    engines = [ScriptedEngine(answer) for _ in range(3)]
    for i, eng in enumerate(engines):
        await world.register("triple", f"triple-{i}", await eng.start())
    await world.routable("triple")
    yield "triple", engines
    await world.unregister("triple")
    for eng in engines:
        eng.close()


async def test_a_poison_body_ejects_nothing_and_costs_two_attempts(world: World,
                                                                  three: tuple[str, list[ScriptedEngine]]) -> None:
    model, engines = three
    before = scrape(world)
    statuses = [await asyncio.to_thread(post, world, chat(model, f"poison {i}")) for i in range(6)]
    after = scrape(world)
    assert statuses == [500] * 6                      # the engines' own answer to that body, relayed
    assert sum(len(e.heads) for e in engines) == 12   # two attempts each, never three
    retries = metric(after, "modelpool_gateway_retries_total") - metric(before, "modelpool_gateway_retries_total")
    assert retries == 6
    assert metric(after, "modelpool_gateway_ejections_total", model=model) == 0
    assert metric(after, "modelpool_gateway_ejected_instances") == 0
    seen = [len(e.heads) for e in engines]
    assert [await asyncio.to_thread(post, world, chat(model, "fine")) for _ in range(30)] == [200] * 30
    assert all(len(e.heads) > n for e, n in zip(engines, seen, strict=True))   # every instance still serves


def test_deep_nesting_is_refused_before_any_engine(world: World) -> None:
    depth = 1000
    body = (b'{"model":"pub","messages":[{"role":"user","content":"x"}],"x":' + b"[" * depth + b"]" * depth + b"}")
    before = scrape(world)
    assert post(world, body) == 400
    after = scrape(world)
    assert metric(after, "modelpool_gateway_retries_total") == metric(before, "modelpool_gateway_retries_total")


def test_an_instance_failing_different_requests_is_ejected(world: World) -> None:
    """'flaky': one of three sims answers 500 to everything; the other two answer."""
    assert all(post(world, chat("flaky", "hi")) == 200 for _ in range(20))
    assert metric(scrape(world), "modelpool_gateway_ejections_total", model="flaky") >= 1
