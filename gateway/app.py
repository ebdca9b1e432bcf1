"""The gateway application: OpenAI routes over a routing table that etcd keeps current.

Background work (cleanup_ctx): one etcd connection, a list-then-watch of ``instances/`` feeding
the RoutingTable and one of ``keys/`` feeding the KeyTable, and the shared upstream session. If
etcd becomes unreachable the watches retry forever while requests keep being routed on the last
table (fail static); ``/readyz`` and the ``modelpool_gateway_etcd_connected`` metric say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
import structlog
from aiohttp import web

from controlplane.keys import Keys
from controlplane.store import EtcdConfig, EtcdStore, watch_prefix
from gateway.auth import ANONYMOUS, KeyTable, Principal, check_model_access
from gateway.ejection import Ejections
from gateway.errors import GatewayError, ModelNotFound, NoCapacity, PayloadTooLarge, error_response
from gateway.metrics import GatewayMetrics
from gateway.proxy import Forwarder, ProxySettings, parse_model
from gateway.table import Endpoint, RoutingTable

log = structlog.get_logger(__name__)

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
    max_body_bytes: int = 32 * 1024 * 1024
    proxy: ProxySettings = field(default_factory=ProxySettings)
    gateway_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class Gateway:
    """Shared state of one gateway process and its request handlers."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.keys = Keys(config.etcd.prefix)
        self.table = RoutingTable()
        self.api_keys = KeyTable()
        self.ejections = Ejections()
        self.metrics = GatewayMetrics()
        self.etcd_connected = False
        self.table_updated_at = 0.0
        self.forwarder: Forwarder | None = None
        self.started = time.time()

    # -- lifecycle ---------------------------------------------------------------------------

    async def background(self, _: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: etcd watches and the upstream session live as long as the app."""
        store = await EtcdStore(self.config.etcd).connect()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
        self.forwarder = Forwarder(session, self.config.proxy)
        self.metrics.bind(self)
        tasks = [asyncio.create_task(self._watch(store, self.keys.instances, self._on_instances), name="watch-instances")]
        if self.config.auth:
            tasks.append(asyncio.create_task(self._watch(store, self.keys.api_keys, self.api_keys.apply),
                                             name="watch-keys"))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await session.close()
            await store.close()

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

    def _on_connectivity(self, up: bool) -> None:
        if up != self.etcd_connected:
            log.info("etcd connectivity", connected=up)
        self.etcd_connected = up

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def errors_middleware(self, request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every error leaves in the OpenAI envelope, with the request id."""
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request["request_id"] = request_id
        try:
            return await handler(request)
        except GatewayError as err:
            return err.response(request_id)
        except web.HTTPRequestEntityTooLarge:
            return PayloadTooLarge(f"request body exceeds {self.config.max_body_bytes} bytes").response(request_id)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            message = f"{request.method} {request.path}: {exc.reason}"
            return error_response(exc.status, message, kind, None, None, None, request_id)

    # -- handlers ----------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal:
        if not self.config.auth:
            return ANONYMOUS
        return self.api_keys.authenticate(request.headers.get("Authorization"))

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/… routed by the body's ``model``."""
        started = time.monotonic()
        request_id = request["request_id"]
        principal = self._principal(request)
        body = await request.read()
        model, _ = parse_model(body)
        status = 0
        try:
            check_model_access(principal, model)
            candidates = self.table.ready(model)
            if not candidates:
                if self.table.known(model):
                    raise NoCapacity(f"model '{model}' has no ready instance right now; retry shortly")
                raise ModelNotFound(f"The model '{model}' does not exist or is not served right now.", param="model")
            assert self.forwarder is not None  # set in background() before the server accepts requests
            usable = self.ejections.filter(candidates)
            resp = await self.forwarder.forward(request, FORWARDED_ROUTES[request.path], body, usable, request_id,
                                                self._on_upstream_result)
            status = resp.status
            return resp
        except GatewayError as err:
            status = err.status
            raise
        finally:
            self.metrics.observe_request(model, request.path, status or 499, time.monotonic() - started)

    def _on_upstream_result(self, ep: Endpoint, failure: str | None) -> None:
        if failure is None:
            self.ejections.succeeded(ep.instance_id)
        elif self.ejections.failed(ep.instance_id):
            self.metrics.ejections.labels(ep.model).inc()
            log.warning("instance ejected", instance=ep.instance_id, model=ep.model, reason=failure,
                        for_s=round(self.ejections.remaining(ep.instance_id), 2))

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: models with at least one READY instance that this key may use."""
        principal = self._principal(request)
        data = [self._model_card(m) for m in self.table.models() if principal.may_use(m)]
        return _json({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}."""
        principal = self._principal(request)
        model = request.match_info["model"]
        if model not in self.table.models() or not principal.may_use(model):
            raise ModelNotFound(f"The model '{model}' does not exist or is not served right now.", param="model")
        return _json(self._model_card(model))

    def _model_card(self, model: str) -> dict[str, object]:
        ready = self.table.ready(model)
        owners = sorted({ep.owner for ep in ready if ep.owner})
        return {
            "id": model, "object": "model", "created": int(self.started), "owned_by": owners[0] if owners else "modelpool",
            "instances": len(ready), "gpu_types": sorted({ep.gpu_type for ep in ready if ep.gpu_type}),
        }

    async def healthz(self, _: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return _json({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        """Readiness: the routing table was loaded once; 'degraded' while etcd is unreachable."""
        body = {"status": "ok", "etcd": "connected" if self.etcd_connected else "unreachable",
                "instances": len(self.table), "models": len(self.table.models()), "revision": self.table.revision}
        if not self.table.loaded:
            body["status"] = "starting"
            return _json(body, status=503)
        if not self.etcd_connected:
            body["status"] = "degraded"  # fail static: still routing on the last table
        return _json(body)

    async def prometheus(self, _: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})


GATEWAY = web.AppKey("gateway", Gateway)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def build_app(config: GatewayConfig) -> web.Application:
    """The aiohttp application of one gateway process."""
    gw = Gateway(config)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[gw.errors_middleware])
    app[GATEWAY] = gw
    app.cleanup_ctx.append(gw.background)
    for path in FORWARDED_ROUTES:
        app.router.add_post(path, gw.forward)
    app.router.add_get("/v1/models", gw.list_models)
    app.router.add_get("/v1/models/{model:.+}", gw.get_model)
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.prometheus)
    return app

