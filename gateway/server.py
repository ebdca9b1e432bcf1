"""The gateway's HTTP/1.1 server: an asyncio.Protocol over httptools, built for a hostile edge.

A general server (aiohttp's) spends about as much time per request as the whole rest of the
gateway; this one does what the gateway needs, keeps bytes as bytes from the client's socket to
the engine's and back, and bounds everything a client controls (``gateway.edge``):

    accept ─ at the connection cap: shed the oldest connection without a request head first
       │
    connection ── httptools ──▶ head complete ──▶ route + admit (API key) ── reject? answer now,
       │   (head deadline,           │               body-size / body-budget      discard the body
       │    not reset per byte)      ▼                                             (linger), close
       │                      Request queued in order; the body is buffered (body deadline)
       │                             │  one task per busy period runs the queue:
       ◀──── write / chunked / backpressure (write timeout) ── handler(request, response)

HTTP behaviour:
- keep-alive (HTTP/1.1 default, HTTP/1.0 on request) and pipelining: responses leave in request
  order; more than ``MAX_PIPELINED`` waiting requests pause reading from the socket.
- HTTP/1.1 requests need exactly one ``Host``; a client ``X-Request-Id`` of up to 128 visible
  ASCII characters is kept, anything else is replaced by a new id.
- a route's ``admit`` check runs at headers-complete; a request it rejects (and a 404/405, a
  Content-Length over ``max_body_bytes``, or a body that does not fit the global body budget) is
  answered at once and its body is read and discarded, never buffered: the answer carries
  ``Connection: close``, our side is half-closed, and the connection closes when the body has
  ended (or after ``linger_s``), so a client still sending reads the answer instead of a reset.
- chunked-request trailers are read and dropped (never headers). ``Upgrade`` is ignored (an h2c
  upgrade is served over HTTP/1.1, as nginx does); ``CONNECT`` gets one 405 and the connection
  closes. ``Expect: 100-continue`` is answered when the request's turn comes.
- request heads are bounded (414 for the URL, 431 for headers), malformed requests get 400 and
  the connection closes; responses of unknown length are chunked (close-delimited for HTTP/1.0).
- a client that goes away (FIN or reset), or stops reading for ``write_timeout_s``, cancels its
  handler (the proxy then closes its upstream connection, so the engine stops generating).
- ``shutdown`` stops accepting, closes idle connections, lets every queued request finish (with
  ``Connection: close``) up to a timeout, then cancels what is left.

Every error leaves in the OpenAI envelope with the request id, and every rejection the server
makes is logged once at info with it (``log_rejection``); a handler that logs its own outcome
sets ``response.logged``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

import httptools
import structlog

from gateway.edge import (
    MAX_HEAD_WAIT_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_URL_BYTES,
    EdgeLimits,
    Phase,
    PhaseClock,
    derive_max_connections,
    raise_nofile_limit,
    valid_request_id,
)
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    RouteNotFound,
    ServerBusy,
    UriTooLong,
)
from gateway.http_message import Admit, Handler, Headers, Request, Response, Route, new_request_id

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "MAX_HEAD_WAIT_BYTES", "MAX_PIPELINED", "MAX_URL_BYTES",
           "WRITE_HIGH_WATER", "Admit", "EdgeLimits", "Handler", "Headers", "HttpConnection", "HttpServer",
           "Request", "Response", "Route", "new_request_id"]

log = structlog.get_logger(__name__)

MAX_PIPELINED = 8            # requests waiting behind the one being answered before reading pauses
WRITE_HIGH_WATER = 256 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
        self._hosts = 0
        self._trailer_bytes = 0
        self._head_wait = 0                      # bytes received since the last complete head
        self._in_head = True
        self._in_message = False                 # some byte of the current request head arrived
        self._current: Request | None = None     # being received
        self._queue: collections.deque[Request | _ParseFailure] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._ignore_input = False               # nothing more is parsed: a parse error, CONNECT, a finished linger
        self._lingering: Request | None = None   # rejected while its body still arrives (discarded)
        self._close_after_linger = False
        self._upgrading: Request | None = None   # llhttp treats it as an upgrade; we do not
        self._continuation: Request | None = None  # the upgrade request whose body a fresh parser reads

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)   # create_server gives stream transports
        srv = self.server
        if len(srv.connections) >= srv.max_connections and not srv.shed_one():
            srv.stats["refused"] += 1
            self._ignore_input = True
            err = ServerBusy("the gateway is at its connection limit; retry shortly")
            resp = Response(self, Request("GET", b"/", [], False, False))
            resp._request.id = new_request_id()
            resp.send_error(err)
            tr.close()
            return
        tr.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        srv.connections.add(self)
        srv.clock.set(self, Phase.HEAD, self.loop.time())   # the first head's deadline runs from accept

    def data_received(self, data: bytes) -> None:
        while data and not self._ignore_input:
            data = self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        """Parse ``data``; returns what follows a request whose Upgrade is ignored (parsed next)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return self._after_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError as exc:  # a callback's exception arrives as the context
            over = exc.__context__
            self._reject(over.error if isinstance(over, _HeadTooLarge)
                         else BadRequest(f"malformed HTTP request: {exc}"))
            return b""
        # httptools keeps a header it has not seen the end of: bound what one head may take
        self._head_wait = self._head_wait + len(data) if self._in_head else 0
        if self._head_wait > MAX_HEAD_WAIT_BYTES:
            self._reject(HeadersTooLarge(f"request head over {MAX_HEAD_WAIT_BYTES} bytes"))
        return b""

    def _after_upgrade(self, rest: bytes) -> bytes:
        """llhttp stopped after a request with Upgrade (or a CONNECT): serve it as plain HTTP/1.1."""
        req, self._upgrading = self._upgrading, None
        if req is None or req.method == "CONNECT":
            self._ignore_input = True   # a tunnel's bytes follow: never parsed as requests
            return b""
        if not req.has_body:
            return rest                 # the same parser goes on with the next request
        # llhttp hands an upgrade request's body to the new protocol; we read it as the body, with a
        # fresh parser primed by a head of the same framing, then carry on with that parser.
        length = req._index.get(b"content-length")
        framing = b"Content-Length: " + length if length is not None else b"Transfer-Encoding: chunked"
        self._parser = httptools.HttpRequestParser(self)
        self._continuation = req
        return b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n" + rest

    def eof_received(self) -> bool:
        # The client closed its side. HTTP clients do that when they give up (a timeout, Ctrl-C),
        # so it counts as leaving: the transport closes and connection_lost cancels the handler,
        # and with it the upstream request, as a reset would (half-closing clients are not served).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.connections.discard(self)
        srv.clock.forget(self)
        srv.writers.forget(self)
        if self._task is not None:
            self._task.cancel()  # the client left: stop the handler (and so the upstream request)
        for item in self._queue:
            if isinstance(item, Request):
                srv.release_body(item)
        if self._current is not None:
            srv.release_body(self._current)
            self._current._wake()
        self._wake_writer()
        srv._progress()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.server.writers.set(self, Phase.BLOCKED, self.loop.time())

    def resume_writing(self) -> None:
        self.write_paused = False
        self.server.writers.set(self, Phase.NONE, 0.0)
        self._wake_writer()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._continuation is not None:
            return
        self._url = b""
        self._headers = []
        self._header_bytes = self._hosts = self._trailer_bytes = 0
        self._in_head = self._in_message = True
        clock = self.server.clock
        if clock.phase(self) is not Phase.HEAD:    # a fresh connection's deadline already runs
            clock.set(self, Phase.HEAD, self.loop.time())

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise _HeadTooLarge(UriTooLong(f"request URL over {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:   # a trailer of a chunked body: bounded, dropped, never a header
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > MAX_HEADER_BYTES:
                raise _HeadTooLarge(HeadersTooLarge(f"request trailers over {MAX_HEADER_BYTES} bytes"))
            return
        if self._continuation is not None:
            return
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if len(name) == 4 and name.lower() == b"host":
            self._hosts += 1
        if len(self._headers) > MAX_HEADERS or self._header_bytes > MAX_HEADER_BYTES:
            raise _HeadTooLarge(HeadersTooLarge(
                f"request headers over the limits ({MAX_HEADERS} headers, {MAX_HEADER_BYTES} bytes)"))

    def on_headers_complete(self) -> None:
        self._in_head = self._in_message = False
        self._head_wait = 0
        if self._continuation is not None:   # the primed head of an upgrade request's body
            self._current = self._continuation
            return
        p = self._parser
        req = Request(p.get_method().decode("ascii", "replace"), self._url, self._headers,
                      p.get_http_version() == "1.0", p.should_keep_alive())
        self._current = req
        rid = req._index.get(b"x-request-id")
        req.id = rid.decode("ascii") if rid is not None and valid_request_id(rid) else new_request_id()
        req.has_body = b"transfer-encoding" in req._index or req._index.get(b"content-length", b"0") not in (b"0", b"")
        if p.should_upgrade():
            self._upgrading = req
        self._enqueue(req)
        error = self.server.admit(req, self._hosts)
        if error is not None:
            if req.method == "CONNECT":
                req.keep_alive = False
            self._reject_request(req, error)
        else:
            self.server.clock.set(self, Phase.BODY if req.has_body else Phase.NONE, self.loop.time())

    def on_body(self, body: bytes) -> None:
        req = self._current
        if req is None or req.rejected or not req.route or not req.route.body:
            return
        srv = self.server
        req.body_size += len(body)
        srv.body_buffered += len(body)
        if req.body_size > srv.limits.max_body_bytes:
            self._reject_request(req, PayloadTooLarge(f"request body exceeds {srv.limits.max_body_bytes} bytes"))
        elif srv.body_buffered > srv.limits.body_budget_bytes:
            srv.stats["body_budget"] += 1
            self._reject_request(req, ServerBusy("the gateway is holding too many request bodies; retry shortly"))
        else:
            req._body_parts.append(body)

    def on_message_complete(self) -> None:
        req = self._current
        if req is not None and req is self._upgrading and req.has_body:
            return   # llhttp ends an upgrade request at its head; its body is still to come (_after_upgrade)
        self._in_head = True
        self._current = None
        self._continuation = None
        if req is None:
            return
        if req.rejected:
            req.complete = True
            if self._lingering is req:   # its discarded body has ended
                self._lingering = None
                self.server.clock.set(self, Phase.NONE, 0.0)
                if self._close_after_linger:   # answered with Connection: close: nothing more is read
                    self._ignore_input = True
                    self._close()
            return
        if req.has_body:
            self.server.clock.set(self, Phase.NONE, 0.0)
        req._finish_body()

    # -- rejection -------------------------------------------------------------------------

    def _reject_request(self, req: Request, error: GatewayError) -> None:
        """Answer ``req`` with ``error`` without reading (the rest of) its body, which is discarded."""
        self.server.release_body(req)
        req._body_parts = []
        req.error = error
        req.rejected = True
        if req.has_body:   # bytes keep coming: discard them until the body ends (answered meanwhile)
            self._lingering = req
            self.server.clock.set(self, Phase.LINGER, self.loop.time())
        else:
            self.server.clock.set(self, Phase.NONE, 0.0)
        req._wake()

    def _reject(self, error: GatewayError) -> None:
        """The input cannot be parsed further: answer in turn with ``error``, then close."""
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # nothing after a parse error can be trusted
        self._ignore_input = True
        self.closing = True
        self.server.clock.set(self, Phase.NONE, 0.0)
        req, self._current = self._current, None
        lingering, self._lingering = self._lingering, None
        if req is not None and not req.complete and not req.rejected:   # its body broke: it gets the error
            self.server.release_body(req)
            req.error = error
            req._wake()
        elif req is None or not req.rejected:
            self._enqueue(_ParseFailure(error))
        elif lingering is not None and self._close_after_linger:   # answered already; the discarded body broke
            self._close()

    # -- deadlines (called by the server's sweep) ------------------------------------------

    def expire(self, phase: Phase) -> None:
        """The deadline of ``phase`` passed."""
        srv = self.server
        srv.stats[f"{phase.name.lower()}_timeout"] += 1
        if phase is Phase.BLOCKED:
            self.abort()   # the client stopped reading: its handler is cancelled, freeing the engine
        elif phase is Phase.BODY:
            self._reject(RequestTimeout(f"request body not received within {srv.limits.body_timeout_s:g} s"))
        elif phase is Phase.HEAD and self._in_message and self.idle:
            self._reject(RequestTimeout(f"request head not received within {srv.limits.head_timeout_s:g} s"))
        elif phase is Phase.HEAD and not self.idle:   # a pipelined head stalled: finish the queue, then close
            self._reject_quietly()
        else:   # idle keep-alive, a connection that never sent a byte, a linger that ran out
            self._lingering = None
            if self.transport is not None:
                self.transport.close()

    def _reject_quietly(self) -> None:
        self._ignore_input = True
        self.closing = True
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- the queue -------------------------------------------------------------------------

    def _enqueue(self, item: Request | _ParseFailure) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_PIPELINED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        """Answer queued requests in order; ends when the queue is empty (or the connection is)."""
        try:
            while self._queue and self.transport is not None and not self.transport.is_closing():
                item = self._queue[0]
                if isinstance(item, _ParseFailure):
                    req = Request("GET", b"/", [], False, False)
                    req.id = new_request_id()
                    Response(self, req).send_error(item.error)
                    self.server.log_rejection(req, item.error)
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
            elif self.server.clock.phase(self) is Phase.NONE and self._current is None:
                self.server.clock.set(self, Phase.IDLE, self.loop.time())
        finally:
            self._task = None
            self.server._progress()

    async def _answer(self, req: Request) -> None:
        structlog.contextvars.bind_contextvars(request_id=req.id)
        resp = Response(self, req)
        try:
            if req.error is None and not req.complete:
                if req.expect_continue:
                    self.write(_CONTINUE)
                await req.read_body()
            if req.error is not None:
                if not req.complete:   # the body is still arriving (discarded): the connection ends after it
                    req.keep_alive = False
                raise req.error
            assert req.route is not None  # set by admit() for every request without an error
            await req.route.handler(req, resp)
            if not resp.ended:
                raise RuntimeError(f"handler for {req.method} {req.path} returned without a complete response")
        except GatewayError as err:
            if resp.started:
                resp.abort()
            else:
                resp.send_error(err)
            if not resp.logged:
                self.server.log_rejection(req, err)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request handler failed", method=req.method, path=req.path[:200])
            if resp.started:
                resp.abort()
            else:
                resp.send_error(GatewayError("internal error in the gateway; see its log for the request id"))
        finally:
            self.server.release_body(req)

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
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        if self._lingering is not None:
            # our answer is out; the client may still be sending the rejected body: half-close and
            # read (discarding) until that body ends, the client closes, or linger_s passes
            self._close_after_linger = True
            if tr.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    tr.write_eof()
            return
        tr.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- idle and shutdown -----------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued, running or half-received."""
        return self._task is None and not self._queue and self._current is None

    def shutdown(self) -> None:
        """Finish what is queued, then close; close at once when idle."""
        self.closing = True
        if self.idle:
            self._close()


class HttpServer:
    """Serves ``routes`` on listening sockets; see the module docstring for the HTTP behaviour."""

    def __init__(self, routes: Mapping[str, Mapping[str, Handler | Route]], *, limits: EdgeLimits | None = None,
                 prefix_routes: Iterable[tuple[str, Mapping[str, Handler | Route]]] = ()) -> None:
        self.limits = limits = limits or EdgeLimits()
        limits.validate()
        self.routes = {path: _routes(methods) for path, methods in routes.items()}
        self.prefix_routes = [(prefix, _routes(methods)) for prefix, methods in prefix_routes]
        self.max_connections = limits.max_connections or derive_max_connections(raise_nofile_limit(),
                                                                                limits.fd_reserve)
        self.connections: set[HttpConnection] = set()
        reading = limits.timeouts()
        self.clock: PhaseClock[HttpConnection] = PhaseClock({p: reading[p] for p in (
            Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.LINGER)})
        self.writers: PhaseClock[HttpConnection] = PhaseClock({Phase.BLOCKED: reading[Phase.BLOCKED]})
        self.body_buffered = 0                          # request-body bytes held now, all connections
        self.stats: collections.Counter[str] = collections.Counter()
        self._tick = max(0.02, min(1.0, min(reading.values()) / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._settled: asyncio.Event | None = None
        self._logged_stats: collections.Counter[str] = collections.Counter()

    # -- decisions at headers-complete -----------------------------------------------------

    def route(self, path: str, method: str) -> Route | GatewayError:
        """The route of ``method path``, or the 404/405 to answer."""
        methods = self.routes.get(path)
        if methods is None:
            methods = next((m for prefix, m in self.prefix_routes if path.startswith(prefix)), None)
            if methods is None:
                return RouteNotFound(f"Invalid URL ({method} {path[:200]})")
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if route is None:
            allowed = ", ".join(sorted(methods))
            return MethodNotAllowed(f"Method {method[:20]} is not allowed for {path[:200]} (allowed: {allowed})",
                                    headers={"Allow": allowed})
        return route

    def admit(self, req: Request, hosts: int) -> GatewayError | None:
        """What is decided from the head alone: framing, route, the route's admit check, body bounds."""
        if hosts > 1 or (hosts == 0 and not req.http10):
            return BadRequest("a request must carry exactly one Host header")
        if req.method == "CONNECT":
            return MethodNotAllowed("CONNECT is not supported", headers={"Allow": "GET, POST"})
        route = self.route(req.path, req.method)
        if isinstance(route, GatewayError):
            return route
        req.route = route
        if route.admit is not None:
            try:
                req.context = route.admit(req)
            except GatewayError as err:
                return err
        length = req._index.get(b"content-length")
        if length is not None and length.isdigit() and route.body:
            size = int(length)
            if size > self.limits.max_body_bytes:
                return PayloadTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes")
            if size > self.limits.body_budget_bytes - self.body_buffered:
                self.stats["body_budget"] += 1
                return ServerBusy("the gateway is holding too many request bodies; retry shortly")
        return None

    def release_body(self, req: Request) -> None:
        """Take ``req``'s buffered body out of the global budget (idempotent)."""
        self.body_buffered -= req.body_size
        req.body_size = 0

    def log_rejection(self, req: Request, err: GatewayError) -> None:
        """One info line per request the server (not a handler) answered with an error."""
        self.stats[f"rejected_{err.status}"] += 1
        log.info("rejected", request_id=req.id, status=err.status, code=err.code, method=req.method[:20],
                 path=req.path[:200], reason=err.message[:300])

    # -- the connection cap ----------------------------------------------------------------

    def shed_one(self) -> bool:
        """At the cap: close the longest-waiting connection that has no request being answered,
        preferring lingering ones, then those still sending a head, then idle keep-alive ones."""
        victim = self.clock.oldest((Phase.LINGER, Phase.HEAD, Phase.IDLE), lambda c: not c._queue)
        if victim is None:
            return False
        self.stats["shed"] += 1
        self.connections.discard(victim)
        self.clock.forget(victim)
        victim.abort()
        return True

    # -- serving ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (bound; listening or not)."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=_backlog()))
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, phase in self.clock.expired(now) + self.writers.expired(now):
            conn.expire(phase)
        if self.stats != self._logged_stats and int(now) != int(now - self._tick):   # at most once a second
            changed = {k: v - self._logged_stats[k] for k, v in self.stats.items() if v != self._logged_stats[k]}
            if changed.keys() - {k for k in changed if k.startswith("rejected_")}:
                log.info("edge events", connections=len(self.connections), **changed)
            self._logged_stats = self.stats.copy()
        self._sweeper = loop.call_later(self._tick, self._sweep)

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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        return cut

    def _progress(self) -> None:
        """A connection finished its queue or closed: a shutdown in progress looks again."""
        if self._settled is not None:
            self._settled.set()


def _routes(methods: Mapping[str, Handler | Route]) -> dict[str, Route]:
    return {m: r if isinstance(r, Route) else Route(r, body=m not in ("GET", "HEAD")) for m, r in methods.items()}


def _backlog() -> int:
    """The kernel's accept-queue cap (a burst of connections must not be dropped by a short queue)."""
    try:
        return max(1024, min(65535, int(Path("/proc/sys/net/core/somaxconn").read_text())))
    except (OSError, ValueError):
        return 4096
