"""One client connection of the gateway's HTTP/1.1 server (``gateway.server``): parsing with
httptools, the request queue, rejection before the body, lingering discard, deadlines' actions.

See ``gateway.server`` for the behaviour as a whole and ``gateway.edge`` for the limits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from gateway.edge import Phase, valid_request_id
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    UriTooLong,
)
from gateway.http_message import Headers, Request, Response, new_request_id

if TYPE_CHECKING:
    from gateway.server import HttpServer

log = structlog.get_logger("gateway.server")

# the phases as module constants: the hot path reads them several times a request
_NONE, _IDLE, _HEAD, _BODY, _LINGER = Phase.NONE, Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.LINGER

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
        limits = server.limits
        self._max_url, self._max_headers, self._max_header_bytes = (limits.max_url_bytes, limits.max_headers,
                                                                    limits.max_header_bytes)
        self._max_head_wait = limits.max_head_wait_bytes
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
        # deadlines (gateway.edge): the reading side's phase since when, on the server's coarse clock
        self.phase = Phase.HEAD
        self.since = server.now
        self.blocked_since = 0.0                 # > 0 while our writes wait for the client to read

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
        srv.connections.add(self)   # the first head's deadline runs from accept (self.since)

    def data_received(self, data: bytes) -> None:
        if not self._ignore_input:
            rest = self._feed(data)
            while rest and not self._ignore_input:   # what followed a request whose Upgrade is ignored
                rest = self._feed(rest)

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
        if self._head_wait > self._max_head_wait:
            self._reject(HeadersTooLarge(f"request head over {self._max_head_wait} bytes"))
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
        self.phase = Phase.NONE
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
        self.blocked_since = self.server.now

    def resume_writing(self) -> None:
        self.write_paused = False
        self.blocked_since = 0.0
        self._wake_writer()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._continuation is not None:   # the primed head: its headers go the way of trailers
            self._in_head = False
            return
        self._url = b""
        self._headers = []
        self._header_bytes = self._hosts = 0
        self._in_head = self._in_message = True
        if self.phase is not _HEAD:    # a fresh connection's deadline already runs
            self.phase = _HEAD
            self.since = self.server.now

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_url:
            raise _HeadTooLarge(UriTooLong(f"request URL over {self._max_url} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:   # a trailer of a chunked body: bounded, dropped, never a header
            self._trailer_bytes += len(name) + len(value)
            if self._trailer_bytes > self._max_header_bytes:
                raise _HeadTooLarge(HeadersTooLarge(f"request trailers over {self._max_header_bytes} bytes"))
            return
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if (name[0] == 72 or name[0] == 104) and len(name) == 4 and name.lower() == b"host":   # H / h
            self._hosts += 1
        if len(self._headers) > self._max_headers or self._header_bytes > self._max_header_bytes:
            raise _HeadTooLarge(HeadersTooLarge(
                f"request headers over the limits ({self._max_headers} headers, {self._max_header_bytes} bytes)"))

    def on_headers_complete(self) -> None:
        self._in_head = self._in_message = False
        self._head_wait = self._trailer_bytes = 0
        if self._continuation is not None:   # the primed head of an upgrade request's body
            self._current = self._continuation
            return
        p = self._parser
        req = Request(p.get_method().decode("ascii", "replace"), self._url, self._headers,
                      p.get_http_version() == "1.0", p.should_keep_alive())
        self._current = req
        index = req._index
        rid = index.get(b"x-request-id")
        req.id = rid.decode("ascii") if rid is not None and valid_request_id(rid) else new_request_id()
        if b"transfer-encoding" in index or index.get(b"content-length", b"0") not in (b"0", b""):
            req.has_body = True
        if b"upgrade" in index or req.method == "CONNECT":
            self._upgrading = req if p.should_upgrade() else None
        self._enqueue(req)
        error = self.server.admit(req, self._hosts)
        if error is not None:
            if req.method == "CONNECT":
                req.keep_alive = False
            self._reject_request(req, error)
        elif req.has_body:
            self.phase = _BODY
            self.since = self.server.now
        else:
            self.phase = _NONE

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
                self.phase = Phase.NONE
                if self._close_after_linger:   # answered with Connection: close: nothing more is read
                    self._ignore_input = True
                    self._close()
            return
        self.phase = _NONE
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
            self.phase = Phase.LINGER
            self.since = self.server.now
        else:
            self.phase = Phase.NONE
        req._wake()

    def _reject(self, error: GatewayError) -> None:
        """The input cannot be parsed further: answer in turn with ``error``, then close."""
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # nothing after a parse error can be trusted
        self._ignore_input = True
        self.closing = True
        self.phase = Phase.NONE
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
        if phase is not Phase.BLOCKED:
            self.phase = Phase.NONE
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
            elif self.phase is _NONE and self._current is None:
                self.phase = _IDLE
                self.since = self.server.now
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
            if req.body_size:
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


