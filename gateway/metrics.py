"""Prometheus metrics of one gateway process (its own registry, scraped at /metrics)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.sse import StreamTap, TokenUsage

# The model label of requests for models the gateway does not know: clients choose the body's
# "model", and one series per made-up name would let them grow /metrics without bound.
UNKNOWN_MODEL = "_unknown"
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
        for labels, (counts, total) in self._series.items():
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
        registry.register(self)  # type: ignore[arg-type]

    def inc(self, labels: str | tuple[str, ...], amount: float = 1) -> None:
        """Add ``amount`` to the series of ``labels``."""
        self.values[labels] = self.values.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        """The Prometheus samples."""
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, value in self.values.items():
            family.add_metric(_label_values(labels), float(value))
        yield family


def _label_values(labels: str | tuple[str, ...]) -> list[str]:
    return list(labels) if isinstance(labels, tuple) else [labels]


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
        self.ejections = Counter("modelpool_gateway_ejections", "Instances ejected after failures", ["model"],
                                 registry=r)
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
