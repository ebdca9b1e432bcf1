"""The gateway application: OpenAI routes over a routing table that etcd keeps current.

``Gateway.start`` runs the background work, then serves HTTP (``gateway.server``); ``stop`` drains.
Background work, every piece a supervised loop (controlplane/loops.py): one etcd connection,
watched caches of ``instances/`` (the RoutingTable), ``keys/`` (the KeyTable) and ``models/``
(private models), an etcd probe (a read with a 2 s deadline every second: a hung etcd shows
within ~3 s), the fleet member (lease, ``gateways/`` registration and cache, demand and usage
writes; gateway/fleet.py), the access-log flush and the shared upstream session. The API routes
answer 503 until the three tables are loaded. If etcd becomes unreachable the caches keep their
last contents and requests keep being routed on them (fail static); ``/readyz``, the
``modelpool_gateway_etcd_connected`` metric and the ``modelpool_loop_*`` metrics say so.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controlplane.etcdspace import DEFAULT_QUOTA_BYTES, SpaceMonitor
from controlplane.keys import Keys
from controlplane.loops import Backoff, LoopState, Supervisor
from controlplane.pb import ApiKey, InstanceRecord, ModelSpec
from controlplane.store import EtcdConfig, EtcdStore, StoreError
from controlplane.store.cache import CacheEvent, WatchedCache, proto_decoder
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
from gateway.table import Endpoint, RoutingTable, engine_card_fields
from gateway.tenancy import ServePolicy, instance_caches, model_card
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
    etcd_probe_interval_s: float = 1.0    # a read with etcd_probe_timeout_s deadline this often
    etcd_probe_timeout_s: float = 2.0
    outage_grace_s: float = 20.0          # after etcd answers again, instances that vanished stay usable this long
    etcd_quota_bytes: int = DEFAULT_QUOTA_BYTES   # etcd's --quota-backend-bytes: warn at 80 % (docs/etcd-layout.md)
    etcd_space_interval_s: float = 30.0
    limits_stale_s: float = 30.0          # etcd away this long: rate limits fall back to limit / N


class Gateway:
    """Shared state of one gateway process and its request handlers."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = Keys(config.etcd.prefix)
        self.serve_policy = ServePolicy()
        self.table = RoutingTable(prefix=config.etcd.prefix, servers=self.serve_policy.servers)
        self.serve_policy.on_change = self.table.policy_changed   # who may serve changed: re-filter
        self.api_keys = KeyTable()
        self.access = ModelAccessTable()
        self.ejections = Ejections()
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter()
        self.usage = UsageBook(config.gateway_id)
        self.demand = DemandMeter(time.monotonic(), config.demand_window_s)
        self.etcd_connected = False
        self.etcd_lost_at: float | None = None   # monotonic time the probe first failed, while it fails
        self.loops = Supervisor()
        self.etcd_space: SpaceMonitor | None = None
        self.caches: list[WatchedCache[Any]] = []
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
            while listen_after_load_s > 0 and not self.state_loaded and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if listen_after_load_s > 0 and not self.state_loaded:
                log.warning("etcd state not loaded yet; listening, API routes answer 503 until it is",
                            waited_s=listen_after_load_s)
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

    @property
    def state_loaded(self) -> bool:
        """True once instances, models and (with auth) keys were listed from etcd (stays true)."""
        return all(c.loaded for c in self.caches) and bool(self.caches)

    def http_server(self) -> HttpServer:
        """The HTTP server of this gateway's routes."""
        # The API key is checked when the request head is complete (Route.admit): a keyless or bad
        # key is answered 401 before one byte of its body is buffered; until the routing, key and
        # model tables are loaded every API route answers 503 (_authenticate).
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
        """etcd caches and probe, the fleet member, the access log and the upstream connection pool.

        Whatever started is stopped again when setup fails halfway (nothing leaks)."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.access_log.flush)
            store = await EtcdStore(self.config.etcd).connect()
            stack.push_async_callback(store.close)
            pool = UpstreamPool(connect_timeout_s=self.config.proxy.connect_timeout_s,
                                max_head_bytes=self.config.edge.max_upstream_head_bytes)
            stack.callback(pool.close)
            self.forwarder = Forwarder(pool, self.config.proxy, on_retry=self.metrics.retries.inc)
            self.metrics.bind(self)
            self.metrics.registry.register(self.loops.collector())  # type: ignore[arg-type]
            stack.push_async_callback(self.loops.close)
            self._start_caches(store)
            self.loops.periodic("etcd-probe", lambda: self._probe(store), interval_s=self.config.etcd_probe_interval_s,
                                backoff=Backoff(base_s=self.config.etcd_probe_interval_s,
                                                max_s=self.config.etcd_probe_interval_s))
            self.loops.periodic("access-log", self._flush_access_log, interval_s=FLUSH_S, run_first=False)
            self.etcd_space = SpaceMonitor(store, self.config.etcd_quota_bytes)
            self.loops.periodic("etcd-space", self.etcd_space.step, interval_s=self.config.etcd_space_interval_s,
                                timeout_s=10.0, backoff=Backoff(base_s=1.0, max_s=self.config.etcd_space_interval_s))
            self.fleet = FleetMember(store, self.keys, self.config.gateway_id, self.config.address, self.config.fleet,
                                     self.usage, self.demand, self.limiter)
            stack.push_async_callback(self.fleet.close)
            await self.fleet.start(self.loops)
            if self.config.worker_metrics_dir:
                self.worker_metrics = WorkerMetrics(self.config.worker_metrics_dir, self.config.worker_slot,
                                                    lambda: self.metrics.render()[0])
                stack.push_async_callback(self.worker_metrics.stop)
                await self.worker_metrics.start()
            yield

    def _start_caches(self, store: EtcdStore) -> None:
        models = WatchedCache(store, self.keys.models, proto_decoder(ModelSpec), name="watch-models",
                              handlers=(self.access.apply, self.serve_policy.apply))
        caches: list[WatchedCache[Any]] = [*instance_caches(store, self.keys, self._on_instances), models]
        if self.config.auth:
            caches.append(WatchedCache(store, self.keys.api_keys, proto_decoder(ApiKey), name="watch-keys",
                                       handlers=(self._on_keys,)))
        self.caches = caches
        for cache in caches:
            cache.start(self.loops)

    async def _flush_access_log(self) -> None:
        self.access_log.flush()

    async def _probe(self, store: EtcdStore) -> None:
        """One etcd read with a short deadline: the truth behind /readyz's ``etcd``."""
        try:
            await store.probe(self.config.etcd_probe_timeout_s)
        except StoreError:
            self._on_connectivity(False)
            raise
        self._on_connectivity(True)

    def _on_instances(self, event: CacheEvent[InstanceRecord], scope: str) -> None:
        self.table.apply(event, scope)
        self.table_updated_at = time.monotonic()
        self.ejections.forget_missing({ep.instance_id for ep in self.table.all()})

    def _on_keys(self, event: CacheEvent[ApiKey]) -> None:
        self.api_keys.apply(event)
        self.limiter.forget(self.api_keys.key_ids())

    def _on_connectivity(self, up: bool) -> None:
        now = time.monotonic()
        if up != self.etcd_connected:
            (log.info if up else log.warning)("etcd connectivity", connected=up)
        if not up:
            if self.etcd_lost_at is None:
                self.etcd_lost_at = now
            self.table.hold_removals(float("inf"))   # leases may all expire when etcd returns
        elif self.etcd_lost_at is not None:
            self.etcd_lost_at = None
            self.table.hold_removals(now + self.config.outage_grace_s)
        self.etcd_connected = up

    # -- handlers ----------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> Principal:
        """The caller of ``request`` (run at headers-complete); Unauthorized (401) without a valid key.

        Until the routing, key and model tables are loaded it answers 503 (Retry-After) instead:
        before that a valid key would get 401 and a private model would be visible."""
        if not self.state_loaded:
            raise NoCapacity("the gateway is starting: its routing, key and model tables are not loaded "
                             "from etcd yet; retry shortly")
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
        # the others' published load is trusted while etcd answers (and a while after it stops)
        fresh = self.etcd_lost_at is None or now - self.etcd_lost_at < self.config.limits_stale_s
        verdict = self.limiter.admit(key, now, fresh=fresh)
        if not verdict.allowed:
            self.metrics.rate_limited.labels(verdict.kind).inc()
            per_min = key.requests_per_minute if verdict.kind == "requests" else key.tokens_per_minute
            raise RateLimited(f"Rate limit reached for key {key.key_id} on {verdict.kind} per min: limit {per_min}. "
                              f"Please try again in {verdict.retry_after_s}s.", kind=verdict.kind,
                              retry_after_s=verdict.retry_after_s, headers=verdict.headers)
        return verdict.headers or None

    def _finished(self, request_id: str, principal: Principal, model: str, route: str, status: int, started: float,
                  ex: Exchange | None, counted: bool, arrived: bool) -> None:
        """Book-keeping after the response ended (or failed): metrics, usage, demand, limits, log."""
        now = time.monotonic()
        self.metrics.observe_request(model if counted else UNKNOWN_MODEL, route, status, now - started)
        usage = ex.usage if ex is not None else None
        if counted:
            error = status >= 400 or (ex is not None and not ex.completed)
            self.usage.record(principal.key_id, principal.owner, model, usage, error=error, now_s=time.time())
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
        return {**model_card(model, ready, self.serve_policy.servers(model), int(self.started)),
                **engine_card_fields(ready)}

    async def healthz(self, _: Request, response: Response) -> None:
        """Liveness: the process answers (``/healthz``, and ``/health`` as vLLM and benchmark clients probe it)."""
        response.send_json(200, {"status": "ok"})

    async def readyz(self, _: Request, response: Response) -> None:
        """Readiness (docs/gateway.md): 503 "starting" until the tables are loaded; then 200, with
        status "degraded" while etcd is unreachable or a loop is failing or stuck (still routing on
        the last tables: fail static), else "ok"."""
        statuses = self.loops.statuses()
        problems = [st.name for st in statuses if st.state in (LoopState.FAILING, LoopState.STUCK, LoopState.STOPPED)]
        lease = self.fleet.session.alive if self.fleet is not None else False
        body: dict[str, object] = {
            "status": "ok", "etcd": "connected" if self.etcd_connected else "unreachable",
            "lease": "held" if lease else "lost",
            "instances": len(self.table), "models": len(self.table.models()), "revision": self.table.revision,
            "refused_instances": len(self.table.refused()),
            "problems": problems, "loops": {st.name: st.to_dict() for st in statuses},
            "etcd_db": self.etcd_space.to_dict() if self.etcd_space is not None else None,
            "warnings": [self.etcd_space.warning] if self.etcd_space is not None and self.etcd_space.warning else [],
        }
        if not self.state_loaded:
            body["status"] = "starting"
            response.send_json(503, body)
            return
        if not self.etcd_connected or problems:
            body["status"] = "degraded"  # fail static: still routing on the last tables
        response.send_json(200, body)

    async def prometheus(self, _: Request, response: Response) -> None:
        """GET /metrics in the Prometheus text format."""
        if self.worker_metrics is not None:  # --workers N: every worker's series, labelled worker="i"
            body, content_type = await self.worker_metrics.render(), CONTENT_TYPE_LATEST
        else:
            body, content_type = self.metrics.render()
        response.send(200, [(b"Content-Type", content_type.encode("latin-1"))], body)
