"""The pool exporter (`ctl exporter`): what etcd says about the pool, for Prometheus.

    GET /metrics     pool gauges from one read of nodes/, instances/ and models/ (cached ~2 s)
    GET /sd/engines  every engine as a Prometheus http_sd target, labelled with its model,
                     instance, node, engine and GPU type
    GET /healthz     the process answers

Why http_sd rather than the agent re-exporting engine gauges: Prometheus needs a discovery
mechanism for the agents anyway (Slurm jobs come and go, with new addresses), and once it has
one it can scrape the engines themselves: their own /metrics with every series and histogram
vLLM (or sglang) exports, unrenamed, with no extra hop, no second copy in the agent and no
agent HTTP server. A target disappears with its instance record (the agent's lease), so a
dead engine stops being scraped within one refresh. The cost: Prometheus must reach the
engines' ports, which the gateways reach anyway (docs/operations.md).

Decision cores (``pool_families``, ``sd_targets``) are pure; the aiohttp shell reads etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controlplane.keys import Keys, decode_all
from controlplane.pb import InstanceRecord, InstanceState, ModelSpec, NodeRecord
from controlplane.store import EtcdStore, StoreError

log = structlog.get_logger(__name__)

CACHE_S = 2.0                   # scrapes (and http_sd refreshes) within this share one etcd read
READ_TIMEOUT_S = 5.0
SD_STATES = (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)  # FAILED: restarts elsewhere
STATE_NAMES = {InstanceState.STARTING: "starting", InstanceState.READY: "ready",
               InstanceState.DRAINING: "draining", InstanceState.FAILED: "failed"}


@dataclass(frozen=True)
class PoolView:
    """One consistent read of the pool (a single etcd revision per prefix)."""

    nodes: tuple[NodeRecord, ...]
    instances: tuple[InstanceRecord, ...]
    catalog: tuple[str, ...]        # model names in models/
    undecodable: int = 0


def pool_families(view: PoolView) -> list[Metric]:
    """The pool gauges for ``view`` (see docs/operations.md for each)."""
    by_state = GaugeMetricFamily("modelpool_pool_instances", "Instances in etcd, by model, state, engine and "
                                 "GPU type", labels=["model", "state", "engine", "gpu_type"])
    counts = Tally((i.model, STATE_NAMES.get(i.state, "unknown"), i.engine, i.gpu_type) for i in view.instances)
    for state_labels, n in sorted(counts.items()):
        by_state.add_metric(list(state_labels), n)

    ready = GaugeMetricFamily("modelpool_pool_model_ready_instances", "READY instances of each catalog or served "
                              "model (0: the model is in the catalog but not served)", labels=["model"])
    ready_counts = Tally(i.model for i in view.instances if i.state == InstanceState.READY)
    for model in sorted(set(view.catalog) | {i.model for i in view.instances}):
        ready.add_metric([model], ready_counts.get(model, 0))

    gpus = GaugeMetricFamily("modelpool_pool_gpus", "GPUs that agents report, by type and whether an instance "
                             "uses them", labels=["gpu_type", "state"])
    gpu_counts: Tally[tuple[str, str]] = Tally()
    for node in view.nodes:
        free = set(node.free_gpu_indices)
        for gpu in node.gpus:
            gpu_counts[(gpu.type, "free" if gpu.index in free else "used")] += 1
    for gpu_labels, n in sorted(gpu_counts.items()):
        gpus.add_metric(list(gpu_labels), n)

    nodes = GaugeMetricFamily("modelpool_pool_nodes", "Agents registered, by whether they are draining and in "
                              "pool mode", labels=["draining", "pool"])
    node_counts = Tally((str(n.draining).lower(), str(n.pool).lower()) for n in view.nodes)
    for node_labels, n in sorted(node_counts.items()):
        nodes.add_metric(list(node_labels), n)

    bad = GaugeMetricFamily("modelpool_pool_undecodable_records", "Records in etcd that do not decode (skipped)")
    bad.add_metric([], view.undecodable)
    return [by_state, ready, gpus, nodes, bad]


def sd_targets(instances: Iterable[InstanceRecord]) -> list[dict[str, object]]:
    """Prometheus http_sd groups: one per engine that is starting, ready or draining.

    Labels are what stays fixed for an instance's life (no state: a label that changes would
    start a new series at every transition); the engine's own series carry the rest.
    """
    out: list[dict[str, object]] = []
    for rec in sorted(instances, key=lambda r: r.instance_id):
        if rec.state not in SD_STATES or not rec.endpoint:
            continue
        try:
            url = urlsplit(rec.endpoint)
            port = url.port
        except ValueError:
            continue
        if url.scheme not in ("http", "https") or not url.hostname or port is None:
            continue
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        out.append({"targets": [f"{host}:{port}"], "labels": {
            "__scheme__": url.scheme, "__metrics_path__": "/metrics", "model": rec.model,
            "instance_id": rec.instance_id, "node_id": rec.node_id, "engine": rec.engine, "gpu_type": rec.gpu_type,
        }})
    return out


async def read_pool(store: EtcdStore, keys: Keys) -> PoolView:
    """One read of nodes, instances and the catalog; StoreError when etcd does not answer."""
    warnings: list[str] = []
    node_kvs, _ = await store.list_prefix(keys.nodes)
    instance_kvs, _ = await store.list_prefix(keys.instances)
    model_kvs, _ = await store.list_prefix(keys.models)
    nodes = [rec for _, rec in decode_all(NodeRecord, node_kvs, warnings)]
    instances = [rec for _, rec in decode_all(InstanceRecord, instance_kvs, warnings)]
    models = [rec.name for _, rec in decode_all(ModelSpec, model_kvs, warnings)]
    for warning in warnings[:5]:
        log.warning("undecodable record", error=warning)
    return PoolView(tuple(nodes), tuple(instances), tuple(models), undecodable=len(warnings))


class _Collector:
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class Exporter:
    """The aiohttp application over one etcd connection."""

    def __init__(self, store: EtcdStore, keys: Keys, cache_s: float = CACHE_S) -> None:
        self.store = store
        self.keys = keys
        self.cache_s = cache_s
        self._view: PoolView | None = None
        self._read_at = -1e9
        self._read_s = 0.0
        self._lock = asyncio.Lock()

    async def view(self) -> PoolView | None:
        """The pool as of at most ``cache_s`` ago; None when etcd cannot be read now."""
        async with self._lock:  # concurrent scrapes share one read
            if time.monotonic() - self._read_at < self.cache_s:
                return self._view
            started = time.monotonic()
            try:
                self._view = await asyncio.wait_for(read_pool(self.store, self.keys), READ_TIMEOUT_S)
            except (StoreError, TimeoutError) as exc:
                log.warning("etcd read failed", error=str(exc))
                self._view = None
            self._read_s = time.monotonic() - started
            self._read_at = time.monotonic()
            return self._view

    async def metrics(self, _: web.Request) -> web.Response:
        """GET /metrics."""
        view = await self.view()
        up = GaugeMetricFamily("modelpool_pool_etcd_up", "1 when the exporter's last etcd read succeeded")
        up.add_metric([], 1 if view is not None else 0)
        took = GaugeMetricFamily("modelpool_pool_read_seconds", "Duration of the exporter's last etcd read")
        took.add_metric([], self._read_s)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector([up, took, *(pool_families(view) if view is not None else [])]))  # type: ignore[arg-type]
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def sd_engines(self, _: web.Request) -> web.Response:
        """GET /sd/engines: 503 when etcd cannot be read (Prometheus then keeps its last targets)."""
        view = await self.view()
        if view is None:
            return web.json_response({"error": "etcd unreachable"}, status=503)
        return web.json_response(sd_targets(view.instances))

    @staticmethod
    async def healthz(_: web.Request) -> web.Response:
        """GET /healthz."""
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        """The routes."""
        app = web.Application()
        app.add_routes([web.get("/metrics", self.metrics), web.get("/sd/engines", self.sd_engines),
                        web.get("/healthz", self.healthz)])
        return app
