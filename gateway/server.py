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
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from gateway.connection import MAX_PIPELINED, WRITE_HIGH_WATER, HttpConnection
from gateway.edge import (
    MAX_HEAD_WAIT_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_URL_BYTES,
    EdgeLimits,
    Phase,
    derive_max_connections,
    overdue,
    raise_nofile_limit,
    shed_victims,
)
from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    ServerBusy,
)
from gateway.http_message import Admit, Handler, Headers, Request, Response, Route, new_request_id

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "MAX_HEAD_WAIT_BYTES", "MAX_PIPELINED", "MAX_URL_BYTES",
           "WRITE_HIGH_WATER", "Admit", "EdgeLimits", "Handler", "Headers", "HttpConnection", "HttpServer",
           "Request", "Response", "Route", "new_request_id"]

log = structlog.get_logger(__name__)


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
        self.timeouts = limits.timeouts()
        self.now = time.monotonic()    # the coarse clock of deadlines, advanced by every sweep
        self.body_buffered = 0                          # request-body bytes held now, all connections
        self.stats: collections.Counter[str] = collections.Counter()
        self._victims: collections.deque[HttpConnection] = collections.deque()
        self._tick = max(0.02, min(1.0, min(self.timeouts.values()) / 4))
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
        if hosts != 1 and (hosts or not req.http10):
            return BadRequest("a request must carry exactly one Host header")
        methods = self.routes.get(req.path)
        route = methods.get(req.method) if methods is not None else None
        if route is None:   # not an exact route and method: the slower checks
            if req.method == "CONNECT":
                return MethodNotAllowed("CONNECT is not supported", headers={"Allow": "GET, POST"})
            found = self.route(req.path, req.method)
            if isinstance(found, GatewayError):
                return found
            route = found
        req.route = route
        if route.admit is not None:
            try:
                req.context = route.admit(req)
            except GatewayError as err:
                return err
        if req.has_body and route.body:
            length = req._index.get(b"content-length")
            if length is not None and length.isdigit():
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
        while True:
            if not self._victims:
                # one walk finds a batch: an attack that fills the cap costs a walk per hundred accepts
                batch = max(16, self.max_connections // 100)
                self._victims.extend(shed_victims(((c, c.phase, c.since) for c in self.connections if not c._queue),
                                                  batch))
                if not self._victims:
                    return False
            victim = self._victims.popleft()
            # still there, still without a request being answered, still in a phase that may be shed?
            if victim in self.connections and not victim._queue and victim.phase in (Phase.LINGER, Phase.HEAD,
                                                                                     Phase.IDLE):
                break
        self.stats["shed"] += 1
        self.connections.discard(victim)
        victim.phase = Phase.NONE
        victim.abort()
        return True

    # -- serving ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (bound; listening or not)."""
        loop = asyncio.get_running_loop()
        self.now = time.monotonic()
        self._servers.append(await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=_backlog()))
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self.now = now = time.monotonic()
        timeouts, write_timeout = self.timeouts, self.timeouts[Phase.BLOCKED]
        for conn in [c for c in self.connections if (c.phase and overdue(c.phase, c.since, now, timeouts))
                     or (c.blocked_since and now - c.blocked_since >= write_timeout)]:
            if conn.blocked_since and now - conn.blocked_since >= write_timeout:
                conn.expire(Phase.BLOCKED)
            elif conn.phase:
                conn.expire(conn.phase)
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
