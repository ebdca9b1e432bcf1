"""The gateway application: OpenAI routes over a routing table that etcd keeps current.

``Gateway.start`` runs the background work, then serves HTTP (``gateway.server``); ``stop`` drains.
Background work: one etcd connection, list-then-watches of ``instances/`` (the
RoutingTable), ``keys/`` (the KeyTable) and ``models/`` (private models), the fleet member (lease,
``gateways/`` registration and watch, demand and usage writes; gateway/fleet.py) and the shared
upstream session. If etcd becomes unreachable the watches retry forever while requests keep
being routed on the last table (fail static); ``/readyz`` and the
``modelpool_gateway_etcd_connected`` metric say so.

    request ─▶ key ─▶ model visible? (404) ─▶ known? (404) ─▶ rate limit (429) ─▶ demand
            ─▶ READY? (503) ─▶ forward (affinity / P2C, retries) ─▶ usage, tokens, access log

Every log line of a request carries its ``request_id`` (structlog contextvars), and each
forwarded request ends with one ``request`` line at info level (batched: gateway/accesslog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controlplane.keys import Keys
from controlplane.store import EtcdConfig, EtcdStore, watch_prefix
from gateway.accesslog import FLUSH_S, AccessLog
from gateway.auth import ANONYMOUS, KeyTable, ModelAccessTable, Principal, check_model_access, model_not_found
from gateway.edge import EdgeLimits
from gateway.ejection import Ejections
from gateway.errors import GatewayError, NoCapacity, RateLimited
from gateway.fleet import FleetMember, FleetSettings
from gateway.limits import RateLimiter
from gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from gateway.proxy import Exchange, Forwarder, ProxySettings, parse_model
from gateway.routing import SESSION_HEADER
from gateway.server import HttpServer, Request, Response, Route
from gateway.sse import TOKEN_FIELDS, with_usage_requested
from gateway.table import Endpoint, RoutingTable
from gateway.upstream import UpstreamPool
from gateway.usage import DemandMeter, UsageBook
from gateway.worker_metrics import WorkerMetrics

log = structlog.get_logger(__name__)

_SESSION = SESSION_HEADER.lower().encode()

# Routes forwarded by the body's "model": client path → engine path.
FORWARDED_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
    "/v1/responses": "/v1/responses",
    "/v1/rerank": "/v1/rerank",
    "/v1/score": "/v1/score",
    "/v1/tokenize": "/tokenize",
    "/v1/detokenize": "/detokenize",
    "/tokenize": "/tokenize",
    "/detokenize": "/detokenize",
}


@dataclass
class GatewayConfig:
    """How one gateway process runs."""

    etcd: EtcdConfig
    auth: bool = True
    edge: EdgeLimits = field(default_factory=EdgeLimits)   # bounds of the HTTP edge (docs/security.md)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    gateway_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    address: str = ""                    # host:port clients reach this gateway at (GatewayRecord)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    demand_window_s: int = 60
    worker_metrics_dir: str = ""          # with --workers N: where workers publish their metrics ports
    worker_slot: int = 0


class Gateway:
    """Shared state of one gateway process and its request handlers."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = Keys(config.etcd.prefix)
        self.table = RoutingTable()
        self.api_keys = KeyTable()
        self.access = ModelAccessTable()
        self.ejections = Ejections()
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter()
        self.usage = UsageBook()
        self.demand = DemandMeter(time.monotonic(), config.demand_window_s)
        self.etcd_connected = False
        self.table_updated_at = 0.0
        self.forwarder: Forwarder | None = None
        self.fleet: FleetMember | None = None
        self.worker_metrics: WorkerMetrics | None = None
        self.started = time.time()
        self.server: HttpServer | None = None
        self.access_log = AccessLog()
        self._max_json_depth = config.edge.max_json_depth
        self._background: contextlib.AsyncExitStack | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, sock: socket.socket, listen_after_load_s: float = 0.0) -> None:
        """Start the background work, then serve ``sock`` (bound; listening or not).

        With ``listen_after_load_s`` > 0 the server starts once the routing table is loaded from
        etcd (or after that many seconds regardless), so that a worker joining running siblings
        on a shared port never answers 404 for models they route.
        """
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.background())
            deadline = time.monotonic() + listen_after_load_s
            while listen_after_load_s > 0 and not self.table.loaded and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if listen_after_load_s > 0 and not self.table.loaded:
                log.warning("routing table not loaded yet; listening anyway", waited_s=listen_after_load_s)
            self.server = self.http_server()
            await self.server.start(sock)
            self._background = stack.pop_all()  # started: stop() tears it down

    async def stop(self, timeout: float) -> None:
        """Drain: stop accepting, finish requests in flight (up to ``timeout`` s), then stop the rest."""
        if self.server is not None:
            cut = await self.server.shutdown(timeout)
            if cut:
                log.warning("drain timed out; connections cut", connections=cut, timeout_s=timeout)
        background, self._background = self._background, None
        if background is not None:
            await background.aclose()

    def http_server(self) -> HttpServer:
        """The HTTP server of this gateway's routes."""
        # The API key is checked when the request head is complete (Route.admit): a keyless or bad
        # key is answered 401 before one byte of its body is buffered.
        forward = {"POST": Route(self.forward, admit=self._authenticate)}
        keyed_get = {"GET": Route(self.list_models, admit=self._authenticate, body=False)}
        live = {"GET": self.healthz}
        server = HttpServer(
            {**{path: forward for path in FORWARDED_ROUTES},
             "/v1/models": keyed_get, "/healthz": live, "/health": live,
             "/readyz": {"GET": self.readyz}, "/metrics": {"GET": self.prometheus}},
            prefix_routes=[("/v1/models/", {"GET": Route(self.get_model, admit=self._authenticate, body=False)})],
            limits=self.config.edge)
        self.metrics.bind_server(server)
        return server

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """etcd watches, the fleet member and the upstream connection pool."""
        store = await EtcdStore(self.config.etcd).connect()
        pool = UpstreamPool(connect_timeout_s=self.config.proxy.connect_timeout_s,
                            max_head_bytes=self.config.edge.max_upstream_head_bytes)
        self.forwarder = Forwarder(pool, self.config.proxy, on_retry=self.metrics.retries.inc)
        self.metrics.bind(self)
        tasks = [asyncio.create_task(self._watch(store, self.keys.instances, self._on_instances),
                                     name="watch-instances"),
                 asyncio.create_task(self._watch(store, self.keys.models, self.access.apply), name="watch-models"),
                 asyncio.create_task(self._flush_access_log(), name="access-log")]
        if self.config.auth:
            tasks.append(asyncio.create_task(self._watch(store, self.keys.api_keys, self._on_keys),
                                             name="watch-keys"))
        self.fleet = FleetMember(store, self.keys, self.config.gateway_id, self.config.address, self.config.fleet,
                                 self.usage, self.demand, self.limiter.set_fleet_size)
        await self.fleet.start()
        if self.config.worker_metrics_dir:
            self.worker_metrics = WorkerMetrics(self.config.worker_metrics_dir, self.config.worker_slot,
                                                lambda: self.metrics.render()[0])
            await self.worker_metrics.start()
        try:
            yield
        finally:
            if self.worker_metrics is not None:
                await self.worker_metrics.stop()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self.fleet.close()
            pool.close()
            await store.close()
            self.access_log.flush()

    async def _flush_access_log(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.access_log.flush()

    async def _watch(self, store: EtcdStore, prefix: str, apply: Callable[..., None]) -> None:
        async for update in watch_prefix(store, prefix, on_connectivity=self._on_connectivity):
            try:
                apply(update)
            except Exception:  # one bad batch must not stop routing updates; the next resync repairs
                log.exception("failed to apply watch update", prefix=prefix)

    def _on_instances(self, update: object) -> None:
        self.table.apply(update)  # type: ignore[arg-type]
        self.table_updated_at = time.monotonic()
        self.ejections.forget_missing({ep.instance_id for ep in self.table.all()})

    def _on_keys(self, update: object) -> None:
        self.api_keys.apply(update)  # type: ignore[arg-type]
        self.limiter.forget(self.api_keys.key_ids())

    def _on_connectivity(self, up: bool) -> None:
        if up != self.etcd_connected:
            log.info("etcd connectivity", connected=up)
        self.etcd_connected = up

    # -- handlers ----------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> Principal:
        """The caller of ``request`` (run at headers-complete); Unauthorized (401) without a valid key."""
        if not self.config.auth:
            return ANONYMOUS
        return self.api_keys.authenticate(request.header(b"authorization"))

    @staticmethod
    def _principal(request: Request) -> Principal:
        # what _authenticate returned at headers-complete (every keyed route has it as its admit)
        return cast(Principal, request.context or ANONYMOUS)

    async def forward(self, request: Request, response: Response) -> None:
        """POST /v1/… routed by the body's ``model``."""
        started = time.monotonic()
        model = ""
        principal = ANONYMOUS
        counted = False      # a visible, known model: the request counts in usage
        arrived = False      # ... and it passed the rate limits: it counts as demand
        ex: Exchange | None = None
        response.logged = True   # the access line of _finished logs every outcome, rejections included
        try:
            principal = self._principal(request)
            body = request.body
            model, payload = parse_model(body, self._max_json_depth)
            candidates = self.table.ready(model)
            exists = bool(candidates) or self.table.known(model) or self.access.in_catalog(model)
            check_model_access(principal, model, self.access, exists=exists)
            counted = True
            extra = self._admit(principal, started)
            self.demand.arrived(model, started)
            arrived = True
            if not candidates:
                raise NoCapacity(f"model '{model}' has no ready instance right now; retry shortly")
            assert self.forwarder is not None  # set in background() before the server accepts requests
            upstream_body = with_usage_requested(request.path, payload, body)
            ex = Exchange(started, session=request.header(_SESSION), strip_usage=upstream_body is not None,
                          request_bytes=len(body),
                          token_field=TOKEN_FIELDS.get(request.path, "content"), extra_headers=extra)
            await self.forwarder.forward(request, response, FORWARDED_ROUTES[request.path], upstream_body or body,
                                         self.ejections.filter(candidates), self._on_upstream_result, ex)
        except GatewayError as err:
            response.status = err.status
            raise
        finally:
            self._finished(request.id, principal, model or UNKNOWN_MODEL, request.path, response.status or 499,
                           started, ex, counted, arrived)

    def _admit(self, principal: Principal, now: float) -> dict[str, str] | None:
        """Take the request from the key's rate limits; RateLimited (429) when over."""
        key = principal.record
        if key is None or not (key.requests_per_minute or key.tokens_per_minute):
            return None
        verdict = self.limiter.admit(key, now)
        if not verdict.allowed:
            self.metrics.rate_limited.labels(verdict.kind).inc()
            per_min = key.requests_per_minute if verdict.kind == "requests" else key.tokens_per_minute
            raise RateLimited(f"Rate limit reached for key {key.key_id} on {verdict.kind} per min: limit {per_min}, "
                              f"shared by {self.limiter.fleet_size} gateway(s). Please try again in "
                              f"{verdict.retry_after_s}s.", kind=verdict.kind, retry_after_s=verdict.retry_after_s,
                              headers=verdict.headers)
        return verdict.headers or None

    def _finished(self, request_id: str, principal: Principal, model: str, route: str, status: int, started: float,
                  ex: Exchange | None, counted: bool, arrived: bool) -> None:
        """Book-keeping after the response ended (or failed): metrics, usage, demand, limits, log."""
        now = time.monotonic()
        self.metrics.observe_request(model if counted else UNKNOWN_MODEL, route, status, now - started)
        usage = ex.usage if ex is not None else None
        if counted:
            error = status >= 400 or (ex is not None and not ex.completed)
            self.usage.record(principal.key_id, model, usage, error=error)
        if arrived:
            self.demand.finished(model, usage, now)
        if usage is not None:
            self.metrics.observe_tokens(model, usage)
            if principal.record is not None:
                self.limiter.charge_tokens(principal.record, usage.total, now)
        if ex is not None and ex.tap is not None and status < 400:
            self.metrics.observe_stream(model, ex.tap)
        self.access_log.request(request_id, model=model if len(model) <= 200 else model[:200] + "...", route=route,
                                status=status, key=principal.key_id,
                                instance=ex.instance_id if ex is not None else "",
                                duration_ms=round((now - started) * 1000, 1),
                                prompt_tokens=usage.prompt_tokens if usage else None,
                                completion_tokens=usage.completion_tokens if usage else None)

    def _on_upstream_result(self, ep: Endpoint, failure: str | None, request_seq: int) -> None:
        if failure is None:
            self.ejections.succeeded(ep.instance_id)
        elif self.ejections.failed(ep.instance_id, request_seq):
            self.metrics.ejections.inc(ep.model)
            log.warning("instance ejected", instance=ep.instance_id, model=ep.model, reason=failure,
                        for_s=round(self.ejections.remaining(ep.instance_id), 2))

    async def list_models(self, request: Request, response: Response) -> None:
        """GET /v1/models: models with at least one READY instance that this key may use."""
        principal = self._principal(request)
        data = [self._model_card(m) for m in self.table.models()
                if self.access.visible(principal, m) and principal.may_use(m)]
        response.send_json(200, {"object": "list", "data": data})

    async def get_model(self, request: Request, response: Response) -> None:
        """GET /v1/models/{model} (the name percent-decoded: /v1/models/org/My%20Model)."""
        principal = self._principal(request)
        model = unquote(request.path.removeprefix("/v1/models/"))
        if (model not in self.table.models() or not self.access.visible(principal, model)
                or not principal.may_use(model)):
            raise model_not_found(model)
        response.send_json(200, self._model_card(model))

    def _model_card(self, model: str) -> dict[str, object]:
        ready = self.table.ready(model)
        owners = sorted({ep.owner for ep in ready if ep.owner})
        return {
            "id": model, "object": "model", "created": int(self.started),
            "owned_by": owners[0] if owners else "modelpool",
            "instances": len(ready), "gpu_types": sorted({ep.gpu_type for ep in ready if ep.gpu_type}),
        }

    async def healthz(self, _: Request, response: Response) -> None:
        """Liveness: the process answers (``/healthz``, and ``/health`` as vLLM and benchmark clients probe it)."""
        response.send_json(200, {"status": "ok"})

    async def readyz(self, _: Request, response: Response) -> None:
        """Readiness: the routing table was loaded once; 'degraded' while etcd is unreachable."""
        body = {"status": "ok", "etcd": "connected" if self.etcd_connected else "unreachable",
                "instances": len(self.table), "models": len(self.table.models()), "revision": self.table.revision}
        if not self.table.loaded:
            body["status"] = "starting"
            response.send_json(503, body)
            return
        if not self.etcd_connected:
            body["status"] = "degraded"  # fail static: still routing on the last table
        response.send_json(200, body)

    async def prometheus(self, _: Request, response: Response) -> None:
        """GET /metrics in the Prometheus text format."""
        if self.worker_metrics is not None:  # --workers N: every worker's series, labelled worker="i"
            body, content_type = await self.worker_metrics.render(), CONTENT_TYPE_LATEST
        else:
            body, content_type = self.metrics.render()
        response.send(200, [(b"Content-Type", content_type.encode("latin-1"))], body)
