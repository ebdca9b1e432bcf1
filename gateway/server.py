"""The gateway's HTTP/1.1 server: an asyncio.Protocol over httptools, built for a proxy's data path.

A general server (aiohttp's) spends about as much time per request as the whole rest of the
gateway: a Request object with lazy multidicts, middleware chains, a task and a StreamResponse
per request. This one does what the gateway needs and nothing else, and keeps bytes as bytes
from the client's socket to the engine's and back:

    connection ── httptools ──▶ Request(method, path, raw headers, body)  (queued in order)
        │                               │  one task per busy period runs the queue:
        │                               ▼
        │                     route(path, method) ──▶ handler(request, response)
        │                                                   │ start(status, headers, length)
        ◀──── write / chunked / pause_writing backpressure ─┘ write(chunk)… end()

HTTP behaviour:
- keep-alive (HTTP/1.1 default, HTTP/1.0 on request) and pipelining: responses leave in request
  order; more than ``MAX_PIPELINED`` waiting requests pause reading from the socket.
- request bodies by Content-Length or chunked, up to ``max_body_bytes`` (413, then the connection
  closes: the rest of the body is never read); ``Expect: 100-continue`` is answered when the
  request's turn comes, or with the 413 instead. Request heads are bounded too: a URL over
  ``MAX_URL_BYTES`` gets 414, more than ``MAX_HEADERS`` headers or ``MAX_HEADER_BYTES`` of them 431.
- responses of unknown length are chunked (close-delimited for HTTP/1.0 clients).
- a client that goes away (FIN or reset) cancels its handler (the proxy then closes its upstream connection, so
  the engine stops generating); a malformed request gets a 400 and the connection closes.
- idle keep-alive connections, and clients that stop sending a request midway, are closed after
  ``keepalive_timeout_s`` of silence.
- ``shutdown`` stops accepting, closes idle connections, lets every queued request finish (with
  ``Connection: close``) up to a timeout, then cancels what is left.

Every error leaves in the OpenAI envelope with the request id (``X-Request-Id``: the client's own
when it sent one, else a new one: a random per-process prefix and a counter), which every log
line of the request carries.
"""

from __future__ import annotations

import asyncio
import collections
import http
import itertools
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from typing import cast

import httptools
import orjson
import structlog

from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    UriTooLong,
    error_body,
)

log = structlog.get_logger(__name__)

MAX_PIPELINED = 8            # requests waiting behind the one being answered before reading pauses
MAX_URL_BYTES = 16 * 1024
MAX_HEADERS = 128
MAX_HEADER_BYTES = 64 * 1024     # names and values of one request
MAX_HEAD_WAIT_BYTES = 1 << 20    # bytes received while no request head completes (one endless header)
WRITE_HIGH_WATER = 256 * 1024

Headers = list[tuple[bytes, bytes]]
Handler = Callable[["Request", "Response"], Awaitable[None]]

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_JSON = (b"Content-Type", b"application/json")


class Request:
    """One parsed request: method, path, raw headers (names as sent) and the whole body."""

    __slots__ = ("_body_done", "_body_parts", "_index", "body", "body_size", "complete", "error",
                 "expect_continue", "headers", "http10", "id", "keep_alive", "method", "path", "query", "too_large")

    def __init__(self, method: str, url: bytes, headers: Headers, http10: bool, keep_alive: bool) -> None:
        path, _, query = url.partition(b"?")
        self.method = method
        self.path = path.decode("latin-1")
        self.query = query
        self.headers = headers
        self.http10 = http10
        self.keep_alive = keep_alive
        self.body = b""
        self.body_size = 0
        self.complete = False
        self.too_large = False
        self.id = ""
        self.error: GatewayError | None = None   # the body could not be parsed (the connection closes)
        self._body_parts: list[bytes] = []
        self._body_done: asyncio.Future[None] | None = None
        self._index: dict[bytes, bytes] = {}
        for name, value in headers:
            self._index.setdefault(name.lower(), value)
        self.expect_continue = self._index.get(b"expect", b"").lower() == b"100-continue"

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case bytes), decoded; None when absent."""
        value = self._index.get(name)
        return value.decode("latin-1") if value is not None else None

    async def read_body(self) -> None:
        """Wait until the body is complete, over the limit, or broken (``too_large`` / ``error``)."""
        while not (self.complete or self.too_large or self.error):
            self._body_done = asyncio.get_running_loop().create_future()
            await self._body_done

    def _finish_body(self) -> None:
        parts = self._body_parts
        self.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body_parts = []
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._body_done is not None and not self._body_done.done():
            self._body_done.set_result(None)


class Response:
    """Writes one response on its connection: ``send`` a whole one, or ``start``/``write``/``end``."""

    __slots__ = ("_bodyless", "_chunked", "_conn", "_request", "ended", "started", "status")

    def __init__(self, conn: HttpConnection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._chunked = False
        self._bodyless = request.method == "HEAD"   # headers as GET would send them, never a body
        self.status = 0
        self.started = False
        self.ended = False

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]], length: int | None) -> list[bytes]:
        conn, req = self._conn, self._request
        self.status = status
        self.started = True
        # While closing, the last queued request gets Connection: close (earlier pipelined ones are
        # still answered); a response of unknown length to HTTP/1.0 ends with the connection.
        keep = (req.keep_alive and not (conn.closing and len(conn._queue) <= 1)
                and (length is not None or not req.http10))
        conn.keep_alive = keep
        out = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nX-Request-Id: %s\r\n" % (
            status, _REASONS.get(status, b"Unknown"), _http_date(), req.id.encode("latin-1"))]
        for name, value in headers:
            out.append(b"%s: %s\r\n" % (name, value))
        if length is not None:
            out.append(b"Content-Length: %d\r\n" % length)
        elif not req.http10:
            self._chunked = not self._bodyless
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not keep:
            out.append(b"Connection: close\r\n")
        elif req.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return out

    def send(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole response at once."""
        out = self._head(status, headers, len(body))
        if not self._bodyless:
            out.append(body)
        self.ended = True
        self._conn.write(b"".join(out))

    def send_json(self, status: int, payload: object, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """``payload`` as a JSON response."""
        self.send(status, [_JSON, *headers], orjson.dumps(payload))

    def send_error(self, err: GatewayError) -> None:
        """A GatewayError in the OpenAI envelope."""
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
        self.send(err.status, [_JSON, *extra], error_body(err.message, err.type, err.param, err.code))

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]], length: int | None = None) -> None:
        """Send the status line and headers; the body follows with ``write`` and ``end``."""
        self._conn.write(b"".join(self._head(status, headers, length)))

    async def write(self, data: bytes) -> None:
        """Send body bytes, waiting while the client reads slower than we write."""
        if self._bodyless:
            return
        if self._chunked:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._conn.write(data)
        if self._conn.write_paused:
            await self._conn.drained()

    def end(self) -> None:
        """The body is complete."""
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self.ended = True

    def abort(self) -> None:
        """Cut the connection: the client must not mistake a broken answer for a whole one."""
        self._conn.keep_alive = False
        self._conn.abort()


class _ParseFailure:
    """Queued in place of a request the parser rejected: answered in turn, then the connection closes."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head over the limits."""

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, one at a time."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closing = False          # answer what is queued, then close (shutdown, Connection: close, errors)
        self.keep_alive = True
        self.write_paused = False
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._head_wait = 0                      # bytes received since the last complete head
        self._in_head = True
        self._current: Request | None = None     # being received
        self._queue: collections.deque[Request | _ParseFailure] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._last_active = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)   # create_server gives stream transports
        tr.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._last_active = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(BadRequest("protocol upgrades are not supported"))
            return
        except httptools.HttpParserError as exc:  # a callback's exception arrives as the context
            over = exc.__context__
            if isinstance(over, _HeadTooLarge):
                self._reject(over.error)
            else:
                self._reject(BadRequest(f"malformed HTTP request: {exc}"))
            return
        # httptools keeps a header it has not seen the end of: bound what one head may take
        self._head_wait = self._head_wait + len(data) if self._in_head else 0
        if self._head_wait > MAX_HEAD_WAIT_BYTES:
            self._reject(HeadersTooLarge(f"request head over {MAX_HEAD_WAIT_BYTES} bytes"))

    def eof_received(self) -> bool:
        # The client closed its side. HTTP clients do that when they give up (a timeout, Ctrl-C),
        # so it counts as leaving: the transport closes and connection_lost cancels the handler,
        # and with it the upstream request, as a reset would (half-closing clients are not served).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._task is not None:
            self._task.cancel()  # the client left: stop the handler (and so the upstream request)
        if self._current is not None:
            self._current._wake()
        self._wake_writer()
        self.server._progress()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise _HeadTooLarge(UriTooLong(f"request URL over {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if len(self._headers) > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _HeadTooLarge(HeadersTooLarge(
                f"request headers over the limits ({MAX_HEADERS} headers, {MAX_HEADER_BYTES} bytes)"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_wait = 0
        p = self._parser
        req = Request(p.get_method().decode("ascii", "replace"), self._url, self._headers,
                      p.get_http_version() == "1.0", p.should_keep_alive())
        length = req._index.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            req.too_large = True
        self._current = req
        self._enqueue(req)

    def on_body(self, body: bytes) -> None:
        req = self._current
        if req is None or req.too_large:
            return
        req.body_size += len(body)
        if req.body_size > self.server.max_body_bytes:
            req.too_large = True
            req._body_parts = []
            req._wake()
        else:
            req._body_parts.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        req = self._current
        self._current = None
        if req is not None:
            req._finish_body()

    # -- the queue -------------------------------------------------------------------------

    def _enqueue(self, item: Request | _ParseFailure) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_PIPELINED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    def _reject(self, error: GatewayError) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # nothing after a parse error can be trusted
        self.closing = True
        req, self._current = self._current, None
        if req is not None and not req.complete:  # its body broke: it is answered with the error
            req.error = error
            req._wake()
        else:
            self._enqueue(_ParseFailure(error))

    async def _run(self) -> None:
        """Answer queued requests in order; ends when the queue is empty (or the connection is)."""
        try:
            while self._queue and self.transport is not None and not self.transport.is_closing():
                item = self._queue[0]
                if isinstance(item, _ParseFailure):
                    resp = Response(self, Request("GET", b"/", [], False, False))
                    resp._request.id = new_request_id()
                    resp.send_error(item.error)
                    self._close()
                    return
                await self._answer(item)
                self._queue.popleft()
                if self._reading_paused and len(self._queue) <= MAX_PIPELINED and not self.closing:
                    self._reading_paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                if not self.keep_alive:
                    self._close()
                    return
            if self.closing:
                self._close()
        finally:
            self._task = None
            self._last_active = self.loop.time()
            self.server._progress()

    async def _answer(self, req: Request) -> None:
        req.id = req.header(b"x-request-id") or new_request_id()
        structlog.contextvars.bind_contextvars(request_id=req.id)
        resp = Response(self, req)
        try:
            if not req.too_large and not req.complete:
                if req.expect_continue:
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await req.read_body()
            if req.error is not None:
                raise req.error  # the connection is closing (_reject)
            if req.too_large:
                self.closing = True  # the rest of the body is never read
                raise PayloadTooLarge(f"request body exceeds {self.server.max_body_bytes} bytes")
            await self.server.route(req.path, req.method)(req, resp)
            if not resp.ended:
                raise RuntimeError(f"handler for {req.method} {req.path} returned without a complete response")
        except GatewayError as err:
            if resp.started:
                resp.abort()
            else:
                resp.send_error(err)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request handler failed", method=req.method, path=req.path)
            if resp.started:
                resp.abort()
            else:
                resp.send_error(GatewayError("internal error in the gateway; see its log for the request id"))

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drained(self) -> None:
        """Wait until the transport takes more data (or the connection is gone)."""
        while self.write_paused and self.transport is not None and not self.transport.is_closing():
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- idle and shutdown -----------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued, running or half-received."""
        return self._task is None and not self._queue and self._current is None

    def _arm_idle_timer(self) -> None:
        self._idle_timer = self.loop.call_at(self._last_active + self.server.keepalive_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if (self._task is None or self._awaiting_body()) and \
                self.loop.time() - self._last_active >= self.server.keepalive_timeout_s:
            self._close()  # idle keep-alive, or a client that stopped sending its request
            return
        self._arm_idle_timer()

    def _awaiting_body(self) -> bool:
        """The request being answered is still waiting for body bytes from the client."""
        head = self._queue[0] if self._queue else None
        return isinstance(head, Request) and not (head.complete or head.too_large or head.error)

    def shutdown(self) -> None:
        """Finish what is queued, then close; close at once when idle."""
        self.closing = True
        if self.idle:
            self._close()


class HttpServer:
    """Serves ``routes`` on listening sockets; see the module docstring for the HTTP behaviour."""

    def __init__(self, routes: Mapping[str, Mapping[str, Handler]], *, max_body_bytes: int,
                 keepalive_timeout_s: float = 75.0,
                 prefix_routes: Iterable[tuple[str, Mapping[str, Handler]]] = ()) -> None:
        self.routes = {path: dict(methods) for path, methods in routes.items()}
        self.prefix_routes = [(prefix, dict(methods)) for prefix, methods in prefix_routes]
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[HttpConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._settled: asyncio.Event | None = None

    def route(self, path: str, method: str) -> Handler:
        """The handler of ``method path``; a handler that raises 404/405 when there is none."""
        methods = self.routes.get(path)
        if methods is None:
            methods = next((m for prefix, m in self.prefix_routes if path.startswith(prefix)), None)
            if methods is None:
                return _raiser(RouteNotFound(f"Invalid URL ({method} {path})"))
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return _raiser(MethodNotAllowed(f"Method {method} is not allowed for {path} (allowed: {allowed})",
                                            headers={"Allow": allowed}))
        return handler

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (bound; listening or not)."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=1024))

    async def shutdown(self, timeout: float) -> int:
        """Stop accepting, let queued requests finish for up to ``timeout`` s, then cut the rest.

        Returns how many connections had to be cut.
        """
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
        self._settled = asyncio.Event()
        deadline = time.monotonic() + timeout
        while any(not c.idle for c in self.connections) and time.monotonic() < deadline:
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        cut = 0
        for conn in list(self.connections):
            if conn.idle:
                conn._close()
            else:
                cut += 1
                conn.abort()
        for srv in self._servers:
            await srv.wait_closed()
        return cut

    def _progress(self) -> None:
        """A connection finished its queue or closed: a shutdown in progress looks again."""
        if self._settled is not None:
            self._settled.set()


def _raiser(err: GatewayError) -> Handler:
    async def handler(request: Request, response: Response) -> None:
        raise err
    return handler


class _RequestIds:
    """32 hex digits: 16 random per process, then a counter (unique without a syscall per request)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # gateway workers are forked

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()

_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
