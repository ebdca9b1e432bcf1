"""Prometheus metrics of one gateway process (its own registry, scraped at /metrics)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.server import HttpServer
    from gateway.sse import StreamTap, TokenUsage

# The model label of requests for models the gateway does not know: clients choose the body's
# "model", and one series per made-up name would let them grow /metrics without bound.
UNKNOWN_MODEL = "_unknown"
# The model label of every private model (ModelSpec.access.public false): /metrics is keyless, and a
# private model's name is not disclosed to anyone its owners did not admit (docs/security.md). The
# series are summed under this label when scraped, so a model made private later vanishes too.
PRIVATE_MODEL = "_private"
Relabel = Callable[[str], str]
_STATUS = {code: str(code) for code in range(100, 600)}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# vLLM's buckets for time to first token and time per output token
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class WeightedHistogram:
    """A labelled histogram whose ``observe`` takes a weight: k equal gaps cost one call, not k.

    Lock-free (a gateway process is one event loop) and one bisect per call: prometheus_client's
    Histogram takes a lock and walks the buckets, and would need one call per token event.
    ``labels`` is the label value (one label) or a tuple of them, in ``labelnames`` order.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry,
                 labelnames: Sequence[str] = ("model",)) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(buckets)
        self._series: dict[str | tuple[str, ...], tuple[list[int], list[float]]] = {}
        self.relabel: Relabel | None = None    # applied to the "model" label when scraped
        registry.register(self)  # type: ignore[arg-type]

    def observe(self, labels: str | tuple[str, ...], value: float, weight: int = 1) -> None:
        """Count ``weight`` observations of ``value``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self._bounds) + 1), [0.0])
        series[0][bisect_left(self._bounds, value)] += weight
        series[1][0] += value * weight

    def collect(self) -> Iterator[Metric]:
        """The Prometheus samples (cumulative buckets, +Inf, sum, count)."""
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        series = self._series
        if self.relabel is not None and "model" in self._labelnames:
            series = _merged_histograms(series, self._labelnames.index("model"), self.relabel)
        for labels, (counts, total) in series.items():
            running, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), float(running)))
            family.add_metric(_label_values(labels), buckets, total[0])
        yield family


class LabelledCounter:
    """A lock-free labelled counter (same exposition as prometheus_client's Counter, less ``_created``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self.values: dict[str | tuple[str, ...], float] = {}
        self.relabel: Relabel | None = None    # applied to the "model" label when scraped
        registry.register(self)  # type: ignore[arg-type]

    def inc(self, labels: str | tuple[str, ...], amount: float = 1) -> None:
        """Add ``amount`` to the series of ``labels``."""
        self.values[labels] = self.values.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        """The Prometheus samples."""
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        values = self.values
        if self.relabel is not None and "model" in self._labelnames:
            at, relabel = self._labelnames.index("model"), self.relabel
            values = {}
            for labels, value in self.values.items():
                key = _relabelled(labels, at, relabel)
                values[key] = values.get(key, 0) + value
        for labels, value in values.items():
            family.add_metric(_label_values(labels), float(value))
        yield family


def _label_values(labels: str | tuple[str, ...]) -> list[str]:
    return list(labels) if isinstance(labels, tuple) else [labels]


def _relabelled(labels: str | tuple[str, ...], at: int, relabel: Relabel) -> str | tuple[str, ...]:
    if isinstance(labels, str):
        return relabel(labels)
    return (*labels[:at], relabel(labels[at]), *labels[at + 1:])


def _merged_histograms(series: dict[str | tuple[str, ...], tuple[list[int], list[float]]], at: int,
                       relabel: Relabel) -> dict[str | tuple[str, ...], tuple[list[int], list[float]]]:
    out: dict[str | tuple[str, ...], tuple[list[int], list[float]]] = {}
    for labels, (counts, total) in series.items():
        key = _relabelled(labels, at, relabel)
        have = out.get(key)
        if have is None:
            out[key] = (list(counts), [total[0]])
        else:
            for i, c in enumerate(counts):
                have[0][i] += c
            have[1][0] += total[0]
    return out


class EdgeCollector:
    """The HTTP edge at scrape time: open connections, the cap, body bytes held, edge events."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """The Prometheus samples."""
        srv = self.server
        yield GaugeMetricFamily("modelpool_gateway_connections", "Client connections open now",
                                value=len(srv.connections))
        yield GaugeMetricFamily("modelpool_gateway_connection_limit", "Client connections accepted at most "
                                "(beyond it the oldest without a request head are shed)", value=srv.max_connections)
        yield GaugeMetricFamily("modelpool_gateway_request_body_bytes_buffered",
                                "Request-body bytes held in memory now (bounded by --body-budget-mb)",
                                value=srv.body_buffered)
        events = CounterMetricFamily("modelpool_gateway_edge_events", "Connections shed or refused at the cap, "
                                     "deadlines that expired, requests the edge rejected (by status)", labels=["event"])
        for name, count in sorted(srv.stats.items()):
            events.add_metric([name], float(count))
        yield events


class GatewayMetrics:
    """Requests (by status, 429s included), latency, TTFT, inter-token gaps, tokens, retries,
    in-flight, routing table, ejections, fleet size, etcd connectivity."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # Updated on every request: lock-free series (one event loop per process).
        self.requests = LabelledCounter("modelpool_gateway_requests", "Requests answered, by model, route and status",
                                        ["model", "route", "status"], r)
        self.duration = WeightedHistogram("modelpool_gateway_request_duration_seconds",
                                          "Time until the response ended", LATENCY_BUCKETS, r, ["model", "route"])
        self.ttft = WeightedHistogram("modelpool_gateway_time_to_first_token_seconds",
                                      "Time from the request to the first streamed content event", TTFT_BUCKETS, r)
        self.itl = WeightedHistogram("modelpool_gateway_inter_token_latency_seconds",
                                     "Gap between streamed content events", ITL_BUCKETS, r)
        self.tokens = LabelledCounter("modelpool_gateway_tokens",
                                      "Tokens reported by engines' usage, by model and kind", ["model", "kind"], r)
        self.ejections = LabelledCounter("modelpool_gateway_ejections", "Instances ejected after failures", ["model"],
                                         r)
        self.retries = Counter("modelpool_gateway_retries", "Requests retried on another instance", registry=r)
        self.rate_limited = Counter("modelpool_gateway_rate_limited", "Requests denied by a key's limit, by limit",
                                    ["kind"], registry=r)
        self.in_flight = Gauge("modelpool_gateway_in_flight_requests", "Requests being proxied now", registry=r)
        self.instances = Gauge("modelpool_gateway_routing_table_instances", "Instances in the routing table",
                               ["state"], registry=r)
        self.etcd = Gauge("modelpool_gateway_etcd_connected", "1 while the etcd watches are connected", registry=r)
        self.ejected = Gauge("modelpool_gateway_ejected_instances", "Instances ejected now", registry=r)
        self.fleet = Gauge("modelpool_gateway_fleet_size", "Live gateways this one sees", registry=r)
        self.etcd_db_size = Gauge("modelpool_gateway_etcd_db_size_bytes", "etcd backend database size (what the "
                                  "quota counts)", registry=r)
        self.etcd_db_in_use = Gauge("modelpool_gateway_etcd_db_size_in_use_bytes", "etcd database bytes in use "
                                    "(the rest is reclaimed by defragmentation)", registry=r)
        self.etcd_quota = Gauge("modelpool_gateway_etcd_quota_bytes", "etcd's quota as configured (--etcd-quota)",
                                registry=r)
        self.etcd_space_warning = Gauge("modelpool_gateway_etcd_space_warning", "1 while the etcd database is near "
                                        "its quota or etcd raised NOSPACE", registry=r)
        self._edge: EdgeCollector | None = None

    def bind(self, gw: Gateway) -> None:
        """Read live values from the gateway at scrape time."""
        self.in_flight.set_function(lambda: gw.forwarder.in_flight.total if gw.forwarder else 0)
        self.etcd.set_function(lambda: 1.0 if gw.etcd_connected else 0.0)
        self.ejected.set_function(lambda: gw.ejections.count_ejected())
        self.fleet.set_function(lambda: gw.limiter.fleet_size)
        space = lambda: gw.etcd_space.status if gw.etcd_space is not None else None  # noqa: E731
        self.etcd_db_size.set_function(lambda: float(st.db_size_bytes) if (st := space()) else 0.0)
        self.etcd_db_in_use.set_function(lambda: float(st.db_size_in_use_bytes) if (st := space()) else 0.0)
        self.etcd_quota.set_function(lambda: float(gw.config.etcd_quota_bytes))
        self.etcd_space_warning.set_function(lambda: 1.0 if gw.etcd_space is not None and gw.etcd_space.warning
                                             else 0.0)
        self._gw = gw

        def public(model: str) -> str:
            return PRIVATE_MODEL if gw.access.is_private(model) else model

        for series in (self.requests, self.duration, self.ttft, self.itl, self.tokens, self.ejections):
            series.relabel = public

    def bind_server(self, server: HttpServer) -> None:
        """Expose the HTTP edge's counters (connections, shed, timeouts, rejections)."""
        if self._edge is None:
            self._edge = EdgeCollector(server)
            self.registry.register(self._edge)  # type: ignore[arg-type]
        else:
            self._edge.server = server

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request (``model`` must come from a bounded set: see UNKNOWN_MODEL)."""
        self.requests.inc((model, route, _STATUS.get(status) or str(status)))
        self.duration.observe((model, route), seconds)

    def observe_tokens(self, model: str, usage: TokenUsage) -> None:
        """Count the tokens of one response."""
        if usage.prompt_tokens:
            self.tokens.inc((model, "prompt"), usage.prompt_tokens)
        if usage.completion_tokens:
            self.tokens.inc((model, "completion"), usage.completion_tokens)

    def observe_stream(self, model: str, tap: StreamTap) -> None:
        """TTFT and inter-token gaps of one streamed response (after it ended, off the hot loop)."""
        ttft = tap.ttft
        if ttft is None:
            return
        self.ttft.observe(model, ttft)
        for gap, events in tap.gaps:
            self.itl.observe(model, gap, events)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from controlplane.pb import InstanceState

        counts: dict[str, int] = {}
        for ep in self._gw.table.all():
            name = InstanceState.Name(ep.state).lower()  # type: ignore[arg-type]
            counts[name] = counts.get(name, 0) + 1
        for state in ("starting", "ready", "draining", "failed"):
            self.instances.labels(state).set(counts.get(state, 0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
