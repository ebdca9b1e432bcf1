"""Attack 3 (billing bypass): every stream is counted, whatever its stream_options hold.

Before: a stream whose stream_options held any key besides include_usage (e.g. {"include_usage":
false, "continuous_usage_stats": false}) was counted as 0 tokens, so tpm limits and `ctl usage`
were bypassed; so was a stream the client cut before its usage event, and any stream of an
engine that reports no usage. Now the gateway asks the engine for usage in every case, strips
exactly what the client did not ask for, and counts from the stream where no usage came.

The property test drives the gateway with generated stream_options (and stream, n, route) and
checks, per request, that the client's bytes equal what the engine answers to the client's own
body, and that the gateway counted exactly the tokens the engines counted (their own
vllm:prompt_tokens / vllm:generation_tokens counters).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
from typing import Any, cast

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.edge import VOLATILE, World, chat_body, eventually, metric, request_bytes

ABSENT = object()


def post(port: int, path: str, body: bytes, key: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def gateway_tokens(world: World, model: str) -> tuple[float, float]:
    text = get_text(world.port, "/metrics")
    return (metric(text, "modelpool_gateway_tokens_total", kind="prompt", model=model),
            metric(text, "modelpool_gateway_tokens_total", kind="completion", model=model))


def engine_tokens(world: World, model: str) -> tuple[float, float]:
    prompt = completion = 0.0
    for sim in world.sims[model]:
        text = get_text(sim.port, "/metrics")
        prompt += metric(text, "vllm:prompt_tokens_total", model_name=model)
        completion += metric(text, "vllm:generation_tokens_total", model_name=model)
    return prompt, completion


def delta(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


Answer = tuple[int, bytes]
Tokens = tuple[float, float]


def through_gateway(world: World, path: str, payload: dict[str, Any]) -> tuple[Answer, Answer, Tokens, Tokens]:
    """(via gateway, direct to an engine, tokens the gateway counted, tokens the engines counted)."""
    body = orjson.dumps(payload)
    g0, e0 = gateway_tokens(world, "pub"), engine_tokens(world, "pub")
    via = post(world.port, path, body, world.keys["ann"])
    counted, truth = delta(gateway_tokens(world, "pub"), g0), delta(engine_tokens(world, "pub"), e0)
    direct = post(world.sims["pub"][0].port, path, body)
    return via, direct, counted, truth


def test_stream_options_with_other_keys_are_billed_and_unchanged(world: World) -> None:
    payload = {"model": "pub", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 4,
               "stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": False}}
    via, direct, counted, truth = through_gateway(world, "/v1/chat/completions", payload)
    assert via[0] == direct[0] == 200
    assert b'"usage"' not in via[1]
    assert VOLATILE.sub(b"", via[1]) == VOLATILE.sub(b"", direct[1])
    assert truth[1] == 4 and counted == truth, (counted, truth)


LAX: st.SearchStrategy[object] = st.sampled_from([True, False, None, 0, 1, "true", "no", "maybe", [], {}])
OPTIONS = st.one_of(
    st.just(ABSENT), st.none(), st.sampled_from(["on", 1, []]),
    st.fixed_dictionaries({}, optional={"include_usage": LAX, "continuous_usage_stats": LAX, "x_unknown": LAX}))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(options=OPTIONS, stream=st.sampled_from([True, True, True, False, ABSENT]), n=st.sampled_from([1, 2]),
       max_tokens=st.integers(1, 4), chat=st.booleans())
def test_property_client_bytes_unchanged_and_count_exact(world: World, options: object, stream: object, n: int,
                                                         max_tokens: int, chat: bool) -> None:
    payload: dict[str, Any] = {"model": "pub", "max_tokens": max_tokens, "n": n}
    if chat:
        payload["messages"] = [{"role": "user", "content": f"tell me {max_tokens} things"}]
    else:
        payload["prompt"] = f"tell me {max_tokens} things"
    if stream is not ABSENT:
        payload["stream"] = stream
    if options is not ABSENT:
        payload["stream_options"] = options
    path = "/v1/chat/completions" if chat else "/v1/completions"
    via, direct, counted, truth = through_gateway(world, path, payload)
    assert via[0] == direct[0], (via, direct)
    assert VOLATILE.sub(b"", via[1]) == VOLATILE.sub(b"", direct[1]), json.dumps(payload)
    assert counted == truth, (payload, counted, truth)


# -- where the engine reports no usage ----------------------------------------------------------


async def _no_usage_engine(events: int) -> tuple[asyncio.Server, int]:
    """An engine that streams ``events`` content events and never a usage event, whatever is asked."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"w%d"}}]}\n\n' % i for i in range(events)]
            chunks.append(b"data: [DONE]\n\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for c in chunks:
                writer.write(b"%x\r\n%s\r\n" % (len(c), c))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_engine_that_reports_no_usage_is_counted_from_the_stream(world: World) -> None:
    no_usage_model = "nousage"
    server, port = await _no_usage_engine(events=7)
    try:
        await world.register(no_usage_model, "nu-1", f"http://127.0.0.1:{port}")
        await world.routable(no_usage_model)
        before = gateway_tokens(world, no_usage_model)
        body = chat_body(no_usage_model, stream=True)
        status, data = await asyncio.to_thread(post, world.port, "/v1/chat/completions", body, world.keys["ann"])
        assert status == 200 and data.count(b"data: {") == 7
        prompt, completion = delta(gateway_tokens(world, no_usage_model), before)
        assert completion == 7 and prompt == len(body) // 4
    finally:
        server.close()
        await world.unregister(no_usage_model)


async def test_stream_cut_by_the_client_before_its_usage_is_still_counted(world: World) -> None:
    """Read a few events of a slow stream, then reset: the tokens received are counted all the same."""
    before = gateway_tokens(world, "slow")
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                               body=chat_body("slow", max_tokens=200, stream=True)))
    got = b""
    while got.count(b'"content": "') < 6:
        got += await asyncio.wait_for(reader.read(65536), 10)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()

    async def counted() -> tuple[float, float] | None:
        d = delta(gateway_tokens(world, "slow"), before)
        return d if d[1] > 0 else None

    prompt, completion = cast(Tokens, await eventually(counted, what="the cut stream counted"))
    assert 5 <= completion < 200 and prompt > 0
