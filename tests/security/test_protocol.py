"""Attack 6, the client side: protocol details at the edge.

Before: Upgrade/CONNECT requests got two responses, so `curl --http2` to a POST route failed and a
reused connection received a stale second response (a response desynchronisation); a
client-chosen 60 KB X-Request-Id was echoed, forwarded and logged; a missing or duplicated Host
was accepted; a 413 was followed by an immediate close, so a client still sending its body never
read it; GET /health was 404. What held keeps holding: ambiguous framing gets 400 and nothing
reaches the engine, hop-by-hop and credential headers are dropped, routes match exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator

import pytest

from tests.security.edge import ScriptedEngine, World, chat_body, parse_responses, raw, request_bytes

HEX32 = re.compile(r"[0-9a-f]{32}")
_names = itertools.count()
JSON_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


@pytest.fixture
async def recorder(world: World) -> AsyncIterator[tuple[ScriptedEngine, str]]:
    eng = ScriptedEngine(JSON_OK)
    model = f"recorded-{next(_names)}"
    await world.register(model, f"{model}-1", await eng.start())
    await world.routable(model)
    yield eng, model
    await world.unregister(model)
    eng.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_http2_upgrade_get_and_post_on_one_connection(world: World) -> None:
    auth = ["-H", f"Authorization: Bearer {world.keys['ann']}"]
    argv = ["curl", "-sS", "--http2", "--max-time", "10", *auth, "-w", "\n%{http_code} %{num_connects}\n",
            f"{world.url}/v1/models", "--next", "--http2", "--max-time", "10", *auth,
            "-H", "Content-Type: application/json", "-d", chat_body("pub").decode(),
            "-w", "\n%{http_code} %{num_connects}\n", f"{world.url}/v1/chat/completions"]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().split("\n")
    models, first, completion, second = json.loads(lines[0]), lines[1], json.loads(lines[2]), lines[3]
    assert first == "200 1" and second == "200 0"          # both answered, over one connection
    assert models["object"] == "list" and "pub" in [m["id"] for m in models["data"]]
    assert completion["object"] == "chat.completion"


async def test_upgrade_requests_get_exactly_one_answer_each(world: World) -> None:
    key = world.keys["ann"]
    h2c = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
           ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")]
    ws = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
    data = (request_bytes("GET", "/v1/models", key=key, headers=h2c)
            + request_bytes("POST", "/v1/chat/completions", key=key, body=chat_body("pub"), headers=h2c)
            + request_bytes("GET", "/healthz", headers=ws)
            + request_bytes("POST", "/v1/chat/completions", key=None, body=chat_body("pub"), headers=h2c)
            + request_bytes("GET", "/healthz"))
    replies = parse_responses(await raw(world.port, data, read_for=6))
    assert [r.status for r in replies] == [200, 200, 200, 401, 200]
    assert all(r.header("upgrade") is None for r in replies)


async def test_connect_gets_one_405_and_the_connection_closes(world: World) -> None:
    data = b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n" + request_bytes("GET", "/healthz")
    replies = parse_responses(await raw(world.port, data, read_for=4))
    assert [r.status for r in replies] == [405]
    assert replies[0].header("connection") == "close"


async def test_an_oversized_request_id_is_replaced_everywhere(world: World,
                                                              recorder: tuple[ScriptedEngine, str]) -> None:
    eng, model = recorder
    huge = "r" * 60_000
    ok = "client-id-42"
    for rid, expect_own in ((huge, False), ("bad id with spaces", False), ("é" * 10, False), (ok, True)):
        data = await raw(world.port, request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                                                   body=chat_body(model), headers=[("X-Request-Id", rid)]),
                         until_closed=False)
        (reply,) = parse_responses(data)
        assert reply.status == 200
        echoed = reply.header("x-request-id") or ""
        assert echoed == rid if expect_own else HEX32.fullmatch(echoed), echoed[:80]
        assert f"X-Request-Id: {echoed}".encode() in eng.heads[-1]
    await asyncio.sleep(0.5)   # the access log is written in batches
    assert "r" * 200 not in world.log_text()


@pytest.mark.parametrize("hosts", [0, 2])
async def test_http11_needs_exactly_one_host(world: World, hosts: int) -> None:
    head = b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"Host: h%d\r\n" % i for i in range(hosts))
    replies = parse_responses(await raw(world.port, head + b"Authorization: Bearer %s\r\n\r\n"
                                        % world.keys["ann"].encode(), until_closed=False))
    assert [r.status for r in replies] == [400]
    assert "Host" in replies[0].envelope()["message"]


async def test_413_reaches_a_client_that_sends_its_whole_body_first(world: World) -> None:
    """Like most HTTP clients: write the whole body, then read the answer (no reset on the way)."""
    body = b"x" * (40 << 20)                # over --max-body-mb (32)
    head = request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                         headers=[("Content-Length", str(len(body)))])

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
            s.sendall(head + body)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    (reply,) = parse_responses(await asyncio.to_thread(client))
    assert reply.status == 413 and reply.envelope()["code"] == "payload_too_large"


async def test_health_is_an_alias_of_liveness(world: World) -> None:
    for path in ("/health", "/healthz"):
        (reply,) = parse_responses(await raw(world.port, request_bytes("GET", path), until_closed=False))
        assert (reply.status, json.loads(reply.body)) == (200, {"status": "ok"})


# -- what held must keep holding -------------------------------------------------------------------


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",        # CL + TE
    b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",                     # two lengths
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",               # a bad chunk size
    b"Content-Length: 2\r\nX-A: b\rX-B: c\r\n\r\n{}",                            # a bare CR
    b"Content-Length: 2\r\nX-A: b\r\n folded\r\n\r\n{}",                         # obs-fold
])
async def test_ambiguous_framing_is_400_and_never_reaches_the_engine(world: World, recorder: tuple[ScriptedEngine, str],
                                                                     framing: bytes) -> None:
    eng, _ = recorder
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n" % world.keys["ann"].encode()
    replies = parse_responses(await raw(world.port, head + framing, read_for=3))
    assert [r.status for r in replies] == [400]
    assert eng.heads == []


async def test_hop_by_hop_and_credentials_are_not_forwarded(world: World, recorder: tuple[ScriptedEngine, str]) -> None:
    eng, model = recorder
    headers = [("Cookie", "session=secret-cookie"), ("Proxy-Authorization", "Basic c2VjcmV0"), ("X-Drop-Me", "1"),
               ("Connection", "keep-alive, X-Drop-Me"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
               ("X-Keep", "yes")]
    data = await raw(world.port, request_bytes("POST", "/v1/chat/completions", key=world.keys["ann"],
                                               body=chat_body(model), headers=headers), until_closed=False)
    assert [r.status for r in parse_responses(data)] == [200]
    (seen,) = eng.heads
    low = seen.lower()
    for gone in (b"cookie", b"proxy-authorization", b"x-drop-me", b"keep-alive: timeout", b"\r\nte:",
                 world.keys["ann"].encode().lower(), b"authorization"):
        assert gone not in low, gone
    assert b"x-keep: yes" in low


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1//chat/completions", "/V1/chat/completions",
                                  "/v1/chat/completions%00", "/healthz/../v1/chat/completions"])
async def test_routes_match_exactly(world: World, path: str) -> None:
    data = await raw(world.port, request_bytes("POST", path, key=world.keys["ann"], body=chat_body("pub")),
                     until_closed=False)
    assert [r.status for r in parse_responses(data)] == [404]
