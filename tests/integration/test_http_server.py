"""Protocol tests for the gateway's own HTTP/1.1 server (gateway/server.py).

A real HttpServer on a loopback socket in the test's event loop, spoken to with hand-written request
bytes over raw ``asyncio.open_connection`` streams, so framing (keep-alive, pipelining, chunked bodies,
Expect, HTTP/1.0, malformed input) is what is under test. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import orjson
import pytest

from gateway.errors import BadRequest
from gateway.server import WRITE_HIGH_WATER, EdgeLimits, HttpServer, Request, Response

WAIT_S = 5.0                      # the bound on every wait that should succeed
HEX32 = re.compile(r"[0-9a-f]{32}")
BIG_CHUNK = 64 * 1024
BIG_TOTAL = 320 * BIG_CHUNK       # 20 MiB
ENVELOPE_KEYS = {"message", "type", "param", "code"}


# -- the handlers under the server ---------------------------------------------------------


class App:
    """The test handlers, and what they saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []              # "METHOD /path" of every handler run, in order
        self.bodies: list[bytes] = []           # the bodies /echo received
        self.wait_started = asyncio.Event()     # /wait is running
        self.release = asyncio.Event()          # lets /wait answer
        self.cancelled = asyncio.Event()        # /wait saw CancelledError
        self.big_started = asyncio.Event()
        self.big_done = asyncio.Event()
        self.big_written = 0

    def routes(self) -> dict[str, dict[str, Callable[[Request, Response], Awaitable[None]]]]:
        return {
            "/echo": {"POST": self.echo},
            "/hello": {"GET": self.hello},
            "/multi": {"GET": self.hello, "POST": self.echo},
            "/tag": {"GET": self.tag},
            "/stream": {"GET": self.stream},
            "/wait": {"GET": self.wait},
            "/bad": {"POST": self.bad},
            "/boom": {"GET": self.boom},
            "/silent": {"GET": self.silent},
            "/half": {"GET": self.half},
            "/big": {"GET": self.big},
        }

    def prefix_routes(self) -> list[tuple[str, dict[str, Callable[[Request, Response], Awaitable[None]]]]]:
        return [("/files/", {"GET": self.path})]

    @staticmethod
    def _query(request: Request) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(request.query.decode()).items()}

    async def echo(self, request: Request, response: Response) -> None:
        self.calls.append(f"{request.method} {request.path}")
        self.bodies.append(request.body)
        response.send(200, [(b"Content-Type", b"text/plain")], b"echo:" + request.body)

    async def hello(self, request: Request, response: Response) -> None:
        self.calls.append(f"{request.method} {request.path}")
        response.send(200, [(b"Content-Type", b"text/plain")], b"hello")

    async def path(self, request: Request, response: Response) -> None:
        response.send(200, [], request.path.encode())

    async def tag(self, request: Request, response: Response) -> None:
        """Answers its ``t`` after sleeping ``delay`` s (the handler is slow; nothing waits on the sleep)."""
        q = self._query(request)
        self.calls.append(f"tag {q['t']} start")
        await asyncio.sleep(float(q.get("delay", "0")))
        self.calls.append(f"tag {q['t']} end")
        response.send(200, [], q["t"].encode())

    async def stream(self, request: Request, response: Response) -> None:
        """``n`` chunks of unknown total length, ``delay`` s apart."""
        q = self._query(request)
        delay = float(q.get("delay", "0"))
        response.start(200, [(b"Content-Type", b"text/event-stream")])
        for i in range(int(q.get("n", "3"))):
            await response.write(b"data: %d\n\n" % i)
            if delay:
                await asyncio.sleep(delay)
        response.end()

    async def wait(self, request: Request, response: Response) -> None:
        self.wait_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        response.send(200, [], b"done")

    async def bad(self, request: Request, response: Response) -> None:
        raise BadRequest("the field is wrong", param="messages")

    async def boom(self, request: Request, response: Response) -> None:
        raise RuntimeError("a bug in a handler")

    async def silent(self, request: Request, response: Response) -> None:
        return None

    async def half(self, request: Request, response: Response) -> None:
        response.start(200, [])
        await response.write(b"partial")
        raise RuntimeError("failed after the headers left")

    async def big(self, request: Request, response: Response) -> None:
        self.big_started.set()
        response.start(200, [(b"Content-Type", b"application/octet-stream")], BIG_TOTAL)
        for i in range(BIG_TOTAL // BIG_CHUNK):
            await response.write(bytes([i % 251]) * BIG_CHUNK)
            self.big_written += BIG_CHUNK
        response.end()
        self.big_done.set()


# -- a minimal HTTP/1.1 client -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunks: list[bytes] | None = None    # the chunk payloads of a chunked body

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def error(self) -> dict[str, object]:
        """The OpenAI error envelope's inner object (asserting its shape)."""
        assert self.header("content-type") == "application/json"
        payload = orjson.loads(self.body)
        assert set(payload) == {"error"}
        assert set(payload["error"]) == ENVELOPE_KEYS
        return payload["error"]


async def eventually_true(check: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.01)


def build(method: str, target: str, *, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None,
          version: str = "1.1") -> bytes:
    """Request bytes; a ``body`` gets a Content-Length unless ``headers`` frame it."""
    lines = [f"{method} {target} HTTP/{version}", "Host: test"]
    lines += [f"{n}: {v}" for n, v in headers]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> Reply:
    """One response: by Content-Length, chunked, or (neither) up to the connection's end."""

    async def read() -> Reply:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        reply = Reply(int(status), [(n.strip(), v.strip()) for n, v in (line.split(":", 1) for line in lines)])
        if reply.status < 200:
            return reply
        assert reply.header("x-request-id"), f"no X-Request-Id on {reply}"
        te, cl = reply.header("transfer-encoding"), reply.header("content-length")
        if head:
            return reply
        if te is not None:
            assert te == "chunked" and cl is None, reply.headers
            reply.chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    assert await reader.readexactly(2) == b"\r\n"
                    break
                reply.chunks.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            reply.body = b"".join(reply.chunks)
        elif cl is not None:
            reply.body = await reader.readexactly(int(cl))
        else:
            reply.body = await reader.read()   # close-delimited
        return reply

    return await asyncio.wait_for(read(), WAIT_S)


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), WAIT_S)

    async def reply(self, *, head: bool = False) -> Reply:
        return await read_reply(self.reader, head=head)

    async def ask(self, data: bytes) -> Reply:
        await self.send(data)
        return await self.reply()

    async def closed_by_server(self, within: float = WAIT_S) -> None:
        """The server ends the connection (FIN or reset) within ``within`` s, sending nothing more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), within)
        except ConnectionResetError:
            return
        assert rest == b"", f"bytes after the last response: {rest[:200]!r}"

    def reset(self) -> None:
        """Go away abruptly: close with SO_LINGER 0, so the server sees a reset."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


@dataclass
class Served:
    server: HttpServer
    port: int
    app: App
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), WAIT_S)
        client = Client(reader, writer)
        self.clients.append(client)
        return client


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Starts HttpServers over App's handlers (max_body_bytes 1024 unless given); cuts them all at the end."""
    started: list[Served] = []

    async def start(**options: float) -> Served:
        app = App()
        options.setdefault("max_body_bytes", 1024)
        server = HttpServer(app.routes(), prefix_routes=app.prefix_routes(),
                            limits=EdgeLimits(**options))  # type: ignore[arg-type]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await server.start(sock)
        served = Served(server, port, app)
        started.append(served)
        return served

    yield start
    for served in started:
        await asyncio.wait_for(served.server.shutdown(0), WAIT_S)
        for client in served.clients:
            client.writer.close()
    await asyncio.sleep(0)  # let the cut connections' cancelled tasks finish


@pytest.fixture
async def srv(start_server: Callable[..., Awaitable[Served]]) -> Served:
    return await start_server()


# -- 1. keep-alive and request ids -----------------------------------------------------------


async def test_keepalive_answers_two_requests_and_echoes_request_id(srv: Served) -> None:
    c = await srv.connect()
    first = await c.ask(build("GET", "/hello", headers=[("X-Request-Id", "client-id-42")]))
    assert (first.status, first.body) == (200, b"hello")
    assert first.header("x-request-id") == "client-id-42"
    assert first.header("connection") is None            # HTTP/1.1: keep-alive by default
    second = await c.ask(build("POST", "/echo", body=b"again"))
    assert (second.status, second.body) == (200, b"echo:again")
    assert HEX32.fullmatch(second.header("x-request-id") or "")
    third = await c.ask(build("GET", "/hello"))
    assert HEX32.fullmatch(third.header("x-request-id") or "")
    assert third.header("x-request-id") != second.header("x-request-id")
    assert len(srv.server.connections) == 1


async def test_connection_close_request_is_answered_then_closed(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("GET", "/hello", headers=[("Connection", "close")]))
    assert (reply.status, reply.body, reply.header("connection")) == (200, b"hello", "close")
    await c.closed_by_server()


# -- 2. pipelining ----------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_even_when_the_first_is_slowest(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/tag?t=a&delay=0.3") + build("GET", "/tag?t=b") + build("POST", "/echo", body=b"c"))
    replies = [await c.reply() for _ in range(3)]
    assert [(r.status, r.body) for r in replies] == [(200, b"a"), (200, b"b"), (200, b"echo:c")]
    # one at a time: b's handler only started after a's finished
    assert srv.app.calls == ["tag a start", "tag a end", "tag b start", "tag b end", "POST /echo"]


# -- 3. chunked request bodies --------------------------------------------------------------


async def test_chunked_request_body_is_dechunked_and_delivered_whole(srv: Served) -> None:
    c = await srv.connect()
    head = build("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
    body = chunked(b"hello ", b"chunked ", b"world")
    await c.send(head + body[:9])      # the body arrives in pieces: the handler must still see all of it
    await c.send(body[9:20])
    await c.send(body[20:])
    reply = await c.reply()
    assert (reply.status, reply.body) == (200, b"echo:hello chunked world")
    assert srv.app.bodies == [b"hello chunked world"]


# -- 4. bodies over max_body_bytes ----------------------------------------------------------


async def test_content_length_over_limit_gets_413_and_close_without_running_the_handler(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Content-Length", "5000")]))  # headers only: enough to refuse
    reply = await c.reply()
    assert reply.status == 413
    err = reply.error()
    assert (err["type"], err["code"]) == ("invalid_request_error", "payload_too_large")
    assert "1024" in str(err["message"])
    assert reply.header("connection") == "close"
    await c.closed_by_server()
    assert srv.app.calls == []


async def test_chunked_body_over_limit_gets_413(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
                 + chunked(b"x" * 600, b"y" * 600))
    reply = await c.reply()
    assert reply.status == 413
    assert reply.error()["code"] == "payload_too_large"
    # the whole body had arrived (and was discarded, never buffered): the connection carries on
    assert reply.header("connection") is None
    assert (await c.ask(build("GET", "/hello"))).body == b"hello"
    assert srv.app.calls == ["GET /hello"]
    assert srv.server.body_buffered == 0


async def test_body_at_exactly_the_limit_is_accepted(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("POST", "/echo", body=b"z" * 1024))
    assert (reply.status, len(reply.body)) == (200, len(b"echo:") + 1024)
    reply = await c.ask(build("POST", "/echo", headers=[("Transfer-Encoding", "chunked")],
                              body=chunked(b"z" * 1000, b"z" * 24)))
    assert (reply.status, len(reply.body)) == (200, len(b"echo:") + 1024)


# -- 5. Expect: 100-continue ----------------------------------------------------------------


async def test_expect_100_continue_then_body(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Content-Length", "11"), ("Expect", "100-continue")]))
    interim = await c.reply()
    assert interim.status == 100
    assert srv.app.calls == []
    await c.send(b"hello world")
    reply = await c.reply()
    assert (reply.status, reply.body) == (200, b"echo:hello world")
    assert (await c.ask(build("GET", "/hello"))).status == 200   # and the connection carries on


async def test_expect_100_continue_with_too_large_length_gets_413_without_100(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Content-Length", "5000"), ("Expect", "100-continue")]))
    reply = await c.reply()
    assert reply.status == 413
    assert reply.error()["code"] == "payload_too_large"
    assert reply.header("connection") == "close"
    await c.closed_by_server()
    assert srv.app.calls == []


# -- 6. routing: 404, 405, HEAD ------------------------------------------------------------


async def test_unknown_path_is_404_in_the_openai_envelope(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("POST", "/nope", body=b"{}"))
    assert reply.status == 404
    err = reply.error()
    assert err == {"message": "Invalid URL (POST /nope)", "type": "invalid_request_error", "param": None,
                   "code": None}
    # the query string is not part of the path; prefix routes match
    assert (await c.ask(build("GET", "/files/a/b?x=1"))).body == b"/files/a/b"
    assert (await c.ask(build("GET", "/files"))).status == 404


async def test_wrong_method_is_405_with_allow(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("DELETE", "/multi"))
    assert reply.status == 405
    assert reply.header("allow") == "GET, POST"
    assert reply.error()["type"] == "invalid_request_error"
    reply = await c.ask(build("GET", "/echo"))
    assert (reply.status, reply.header("allow")) == (405, "POST")


async def test_head_on_a_get_route_has_content_length_but_no_body(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("HEAD", "/hello") + build("GET", "/hello"))
    head = await c.reply(head=True)
    assert head.status == 200
    assert head.header("content-length") == "5"
    assert head.header("content-type") == "text/plain"
    # had the body been sent, it would sit where the next status line is expected
    after = await c.reply()
    assert (after.status, after.body) == (200, b"hello")



async def test_head_on_a_streaming_get_route_sends_no_body(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("HEAD", "/stream?n=3") + build("GET", "/hello"))
    head = await c.reply(head=True)
    assert head.status == 200 and head.header("transfer-encoding") == "chunked"
    # a chunk of the streamed body here would be read as the next status line
    after = await c.reply()
    assert (after.status, after.body) == (200, b"hello")


# -- 7. malformed requests ------------------------------------------------------------------


async def test_malformed_request_gets_400_then_close(srv: Served) -> None:
    c = await srv.connect()
    await c.send(b"GARBAGE\r\n\r\n")
    reply = await c.reply()
    assert reply.status == 400
    err = reply.error()
    assert err["type"] == "invalid_request_error"
    assert str(err["message"]).startswith("malformed HTTP request")
    assert reply.header("connection") == "close"
    await c.closed_by_server()


async def test_request_heads_over_the_limits_get_414_and_431_then_close(srv: Served) -> None:
    from gateway.server import MAX_HEADER_BYTES, MAX_HEADERS, MAX_URL_BYTES

    cases = [
        (b"GET /" + b"a" * MAX_URL_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /ok HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
        (b"GET /ok HTTP/1.1\r\nX-Big: " + b"v" * MAX_HEADER_BYTES + b"\r\n\r\n", 431),
    ]
    for raw, status in cases:
        c = await srv.connect()
        await c.send(raw)
        resp = await c.reply()
        assert resp.status == status, (status, resp.status)
        assert orjson.loads(resp.body)["error"]["type"] == "invalid_request_error"
        await c.closed_by_server()


async def test_a_head_that_never_ends_is_cut_off_at_the_limit(srv: Served) -> None:
    from gateway.server import MAX_HEAD_WAIT_BYTES

    c = await srv.connect()
    await c.send(b"GET /ok HTTP/1.1\r\nX-Endless: ")
    chunk = b"v" * 65536
    sent = 0
    with contextlib.suppress(ConnectionError, TimeoutError):
        while sent < 8 * MAX_HEAD_WAIT_BYTES:
            await c.send(chunk)
            sent += len(chunk)
    # The server answers 431 and closes with our bytes unread, so the client may see the reset
    # before the answer (TCP drops what it had received); either way it stopped reading at the limit.
    with contextlib.suppress(ConnectionResetError, asyncio.IncompleteReadError):
        assert (await c.reply()).status == 431
    assert sent < 8 * MAX_HEAD_WAIT_BYTES, "the server kept reading an endless request head"


async def test_a_broken_chunked_body_gets_400_and_frees_the_connection(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\nzz\r\n")
    reply = await c.reply()
    assert reply.status == 400 and "malformed HTTP request" in str(reply.error()["message"])
    await c.closed_by_server()
    await eventually_true(lambda: not srv.server.connections, "the connection is released")


async def test_malformed_request_after_a_good_one_is_answered_in_turn(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/tag?t=first&delay=0.1") + b"NOT HTTP AT ALL\r\n\r\n")
    first = await c.reply()
    assert (first.status, first.body) == (200, b"first")
    second = await c.reply()
    assert second.status == 400
    assert second.header("connection") == "close"
    await c.closed_by_server()


# -- 8. handler errors ----------------------------------------------------------------------


async def test_gateway_error_is_answered_with_its_status_and_envelope(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("POST", "/bad", headers=[("X-Request-Id", "rid-bad")], body=b"{}"))
    assert reply.status == 400
    assert reply.error() == {"message": "the field is wrong", "type": "invalid_request_error",
                             "param": "messages", "code": None}
    assert reply.header("x-request-id") == "rid-bad"
    assert reply.header("connection") is None


async def test_runtime_error_is_500_and_the_connection_stays_usable(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("GET", "/boom"))
    assert reply.status == 500
    err = reply.error()
    assert err["type"] == "server_error"
    assert "a bug in a handler" not in str(err["message"])   # internals do not leak to the client
    assert reply.header("connection") is None
    again = await c.ask(build("GET", "/hello"))
    assert (again.status, again.body) == (200, b"hello")


async def test_handler_failing_after_headers_cuts_the_connection(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/half"))
    head = await c.reply(head=True)
    assert (head.status, head.header("transfer-encoding")) == (200, "chunked")
    try:
        rest = await asyncio.wait_for(c.reader.read(), WAIT_S)
    except ConnectionResetError:
        rest = b""
    assert not rest.endswith(b"0\r\n\r\n")   # never the last chunk: the client must see a broken answer


# -- 9. streaming responses: chunked for 1.1, close-delimited for 1.0 -----------------------


async def test_streaming_response_is_chunked_for_http11(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("GET", "/stream?n=4&delay=0.01"))
    assert reply.status == 200
    assert reply.header("transfer-encoding") == "chunked"
    assert reply.header("content-length") is None
    assert reply.chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    assert reply.header("connection") is None
    assert (await c.ask(build("GET", "/hello"))).body == b"hello"


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_streaming_response_is_close_delimited_for_http10(srv: Served, keep_alive: bool) -> None:
    c = await srv.connect()
    headers = [("Connection", "keep-alive")] if keep_alive else []
    reply = await c.ask(build("GET", "/stream?n=3", headers=headers, version="1.0"))
    assert reply.status == 200
    assert reply.header("transfer-encoding") is None
    assert reply.header("content-length") is None
    assert reply.header("connection") == "close"
    assert reply.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"   # read up to the server's close
    assert c.reader.at_eof()


async def test_http10_keep_alive_with_known_length_keeps_the_connection(srv: Served) -> None:
    c = await srv.connect()
    keep = [("Connection", "keep-alive")]
    first = await c.ask(build("GET", "/hello", headers=keep, version="1.0"))
    assert (first.status, first.body) == (200, b"hello")
    assert first.header("connection") == "keep-alive"
    assert first.header("content-length") == "5"
    second = await c.ask(build("POST", "/echo", headers=keep, body=b"x", version="1.0"))
    assert (second.status, second.body, second.header("connection")) == (200, b"echo:x", "keep-alive")


async def test_http10_without_keep_alive_closes_after_the_response(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("GET", "/hello", version="1.0"))
    assert (reply.status, reply.body, reply.header("connection")) == (200, b"hello", "close")
    await c.closed_by_server()


# -- 10. client disconnect ------------------------------------------------------------------


async def test_client_reset_mid_handler_cancels_the_handler(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/wait"))
    await asyncio.wait_for(srv.app.wait_started.wait(), WAIT_S)
    assert not srv.app.cancelled.is_set()
    c.reset()
    await asyncio.wait_for(srv.app.cancelled.wait(), WAIT_S)
    assert not srv.app.release.is_set()


async def test_client_closing_its_side_mid_handler_cancels_the_handler(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/wait"))
    await asyncio.wait_for(srv.app.wait_started.wait(), WAIT_S)
    c.writer.write_eof()  # FIN, as a client that times out and closes its socket sends
    await asyncio.wait_for(srv.app.cancelled.wait(), WAIT_S)
    assert not srv.app.release.is_set()


# -- 11. backpressure -------------------------------------------------------------------------


async def test_write_blocks_while_the_client_does_not_read(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/big"))
    await asyncio.wait_for(srv.app.big_started.wait(), WAIT_S)
    # Without backpressure the whole 20 MiB would be buffered in well under a second.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(srv.app.big_done.wait(), 1.0)
    assert 0 < srv.app.big_written < BIG_TOTAL
    (conn,) = srv.server.connections
    assert conn.write_paused
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + BIG_CHUNK
    reply = await c.reply()
    assert reply.status == 200
    assert len(reply.body) == BIG_TOTAL
    for i in (0, 1, 250, 251, BIG_TOTAL // BIG_CHUNK - 1):
        assert reply.body[i * BIG_CHUNK:(i + 1) * BIG_CHUNK] == bytes([i % 251]) * BIG_CHUNK
    await asyncio.wait_for(srv.app.big_done.wait(), WAIT_S)
    assert srv.app.big_written == BIG_TOTAL


# -- 12. idle keep-alive timeout --------------------------------------------------------------


async def test_idle_keepalive_connection_is_closed_after_the_timeout(start_server: Callable[..., Awaitable[Served]],
                                                                     ) -> None:
    srv = await start_server(keepalive_timeout_s=0.3, head_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    c = await srv.connect()
    assert (await c.ask(build("GET", "/hello"))).status == 200
    answered = loop.time()
    await c.closed_by_server(within=2.0)
    assert loop.time() - answered >= 0.25        # the keep-alive timer, not an immediate close
    silent = await srv.connect()                # a connection that never sends anything
    await silent.closed_by_server(within=2.0)


async def test_a_client_that_stops_sending_its_body_is_timed_out(start_server: Callable[..., Awaitable[Served]]
                                                                   ) -> None:
    srv = await start_server(body_timeout_s=0.3)
    c = await srv.connect()
    await c.send(build("POST", "/echo", headers=[("Content-Length", "10")]) + b"ab")
    reply = await c.reply()
    assert (reply.status, reply.error()["code"], reply.header("connection")) == (408, "request_timeout", "close")
    await c.closed_by_server(within=3.0)
    assert srv.server.body_buffered == 0


async def test_request_in_progress_outlives_the_keepalive_timeout(start_server: Callable[..., Awaitable[Served]],
                                                                  ) -> None:
    srv = await start_server(keepalive_timeout_s=0.3)
    c = await srv.connect()
    slow = await c.ask(build("GET", "/tag?t=slow&delay=1.0"))       # more than three timeouts long
    assert (slow.status, slow.body) == (200, b"slow")
    streamed = await c.ask(build("GET", "/stream?n=5&delay=0.2"))   # a slow stream, likewise
    assert streamed.body.count(b"data:") == 5
    assert (await c.ask(build("GET", "/hello"))).body == b"hello"  # idleness counts from the end
    await c.closed_by_server(within=2.0)


# -- 13. shutdown -----------------------------------------------------------------------------


async def test_shutdown_closes_idle_refuses_new_and_drains_in_flight(srv: Served) -> None:
    busy = await srv.connect()
    await busy.send(build("GET", "/wait"))
    await asyncio.wait_for(srv.app.wait_started.wait(), WAIT_S)
    idle = await srv.connect()
    assert (await idle.ask(build("GET", "/hello"))).status == 200
    shutdown = asyncio.create_task(srv.server.shutdown(5))
    await idle.closed_by_server(within=1.0)
    with pytest.raises(OSError):
        await srv.connect()
    assert not shutdown.done()
    assert not srv.app.cancelled.is_set()
    srv.app.release.set()
    reply = await busy.reply()
    assert (reply.status, reply.body) == (200, b"done")
    assert reply.header("connection") == "close"
    await busy.closed_by_server()
    assert await asyncio.wait_for(shutdown, WAIT_S) == 0
    assert not srv.app.cancelled.is_set()


async def test_shutdown_answers_every_queued_pipelined_request(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/wait") + build("POST", "/echo", body=b"queued"))
    await asyncio.wait_for(srv.app.wait_started.wait(), WAIT_S)
    shutdown = asyncio.create_task(srv.server.shutdown(5))
    await asyncio.sleep(0)                       # one loop turn: shutdown's first step marks connections closing
    assert all(conn.closing for conn in srv.server.connections)
    srv.app.release.set()
    first, second = await c.reply(), await c.reply()
    assert (first.status, first.body, first.header("connection")) == (200, b"done", None)
    assert (second.status, second.body, second.header("connection")) == (200, b"echo:queued", "close")
    await c.closed_by_server()
    assert await asyncio.wait_for(shutdown, WAIT_S) == 0


async def test_shutdown_timeout_cuts_and_cancels_a_handler_that_never_finishes(srv: Served) -> None:
    c = await srv.connect()
    await c.send(build("GET", "/wait"))
    await asyncio.wait_for(srv.app.wait_started.wait(), WAIT_S)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await asyncio.wait_for(srv.server.shutdown(0.3), WAIT_S) == 1
    assert 0.25 <= loop.time() - began < 2.0
    await asyncio.wait_for(srv.app.cancelled.wait(), WAIT_S)
    await c.closed_by_server()


# -- 14. a handler that never responds ----------------------------------------------------------


async def test_handler_returning_without_a_response_gets_500(srv: Served) -> None:
    c = await srv.connect()
    reply = await c.ask(build("GET", "/silent"))
    assert reply.status == 500
    assert reply.error()["type"] == "server_error"
    assert (await c.ask(build("GET", "/hello"))).body == b"hello"
