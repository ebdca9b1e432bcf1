"""Attack 6, the engine side: what an engine sends is bounded before it reaches a client.

Before: an engine's response head had no size limit (20 MB of headers reached the client); bytes
past an engine's Content-Length were appended to the client's body (a second response smuggled
behind the first); a 100/103 was taken as the final response; chunked-request trailers reached
the engine as request headers. Now: 502 past 64 KiB of head, excess bytes dropped and the engine
connection closed, 1xx skipped (101 refused: 502), trailers dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from tests.security.edge import Reply, ScriptedEngine, World, chat_body, parse_responses, raw, request_bytes

_names = itertools.count()
JSON_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


@pytest.fixture
async def engine(world: World) -> AsyncIterator[tuple[ScriptedEngine, str]]:
    """A scripted engine registered as the only instance of a fresh model; set ``.answer`` first."""
    eng = ScriptedEngine(JSON_OK)
    model = f"scripted-{next(_names)}"
    url = await eng.start()
    await world.register(model, f"{model}-1", url)
    await world.routable(model)
    yield eng, model
    await world.unregister(model)
    eng.close()


async def ask(world: World, model: str, **kw: object) -> tuple[list[Reply], bytes]:
    data = await raw(world.port, request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                                               body=chat_body(model), **kw),  # type: ignore[arg-type]
                     read_for=8, until_closed=False)
    return parse_responses(data), data


async def test_a_20mb_response_head_is_a_502(world: World, engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    eng.answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * (20 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}"
    replies, data = await ask(world, model)
    assert [r.status for r in replies] == [502]
    assert "head over" in replies[0].envelope()["message"]
    assert len(data) < 4096


async def test_bytes_past_content_length_never_reach_the_client(world: World,
                                                               engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    eng.answer = JSON_OK + smuggled
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    try:
        got = b""
        for _ in range(2):   # the second request on the same client connection gets its own answer
            writer.write(request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"], body=chat_body(model)))
            count = len(parse_responses(got)) + 1
            while len(parse_responses(got)) < count:
                got += await asyncio.wait_for(reader.read(65536), 8)
    finally:
        writer.close()
    replies = parse_responses(got)
    assert [(r.status, r.body) for r in replies] == [(200, b"{}"), (200, b"{}")]
    assert b"EVIL" not in got
    await asyncio.wait_for(eng.closed_by_peer.wait(), 5)   # the spent engine connection was closed


async def test_interim_1xx_answers_are_skipped(world: World, engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    eng.answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                  + JSON_OK)
    replies, _ = await ask(world, model)
    assert [(r.status, r.body) for r in replies] == [(200, b"{}")]
    assert replies[0].header("link") is None


async def test_an_engine_switching_protocols_is_refused(world: World, engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    eng.answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw tunnel"
    replies, data = await ask(world, model)
    assert [r.status for r in replies] == [502]
    assert b"raw tunnel" not in data


async def test_chunked_request_trailers_never_become_headers(world: World,
                                                             engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    body = chat_body(model)
    chunked = b"%x\r\n%s\r\n0\r\nX-Evil: injected\r\nAuthorization: Bearer stolen\r\n\r\n" % (len(body), body)
    head = request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                         headers=[("Transfer-Encoding", "chunked")])
    replies = parse_responses(await raw(world.port, head + chunked, read_for=8, until_closed=False))
    assert [r.status for r in replies] == [200]
    (seen,) = eng.heads
    assert b"x-evil" not in seen.lower() and b"stolen" not in seen


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_engine_error_outside_the_envelope_reaches_the_client_in_it(world: World,
                                                                            engine: tuple[ScriptedEngine, str],
                                                                            framing: str) -> None:
    eng, model = engine
    text = b"500 Internal Server Error\n\nServer got itself in trouble"
    if framing == "length":
        eng.answer = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: %d"
                      b"\r\n\r\n%s" % (len(text), text))
    else:
        eng.answer = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(text), text))
    replies, _ = await ask(world, model)
    assert [r.status for r in replies] == [500]
    err = replies[0].envelope()
    assert err["type"] == "upstream_error" and "Server got itself in trouble" in err["message"]
    assert replies[0].header("content-type") == "application/json"


async def test_a_large_head_in_one_write_and_endless_interims_are_502(world: World,
                                                                     engine: tuple[ScriptedEngine, str]) -> None:
    eng, model = engine
    eng.answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * (100 << 10) + b"\r\nContent-Length: 2\r\n\r\n{}"
    replies, _ = await ask(world, model)
    assert [r.status for r in replies] == [502]
    eng.answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 9 + JSON_OK
    replies, _ = await ask(world, model)
    assert [r.status for r in replies] == [502]
    assert "interim" in replies[0].envelope()["message"]
