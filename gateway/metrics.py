"""Prometheus metrics of one gateway process (its own registry, scraped at /metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from gateway.app import Gateway

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """Request counters and latency, in-flight, routing table, ejections, etcd connectivity."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("modelpool_gateway_requests", "Requests answered, by model, route and status",
                                ["model", "route", "status"], registry=r)
        self.duration = Histogram("modelpool_gateway_request_duration_seconds", "Time until the response ended",
                                  ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ejections = Counter("modelpool_gateway_ejections", "Instances ejected after failures", ["model"],
                                 registry=r)
        self.retries = Gauge("modelpool_gateway_retries", "Requests retried on another instance (total)",
                             registry=r)
        self.in_flight = Gauge("modelpool_gateway_in_flight_requests", "Requests being proxied now", registry=r)
        self.instances = Gauge("modelpool_gateway_routing_table_instances", "Instances in the routing table",
                               ["state"], registry=r)
        self.etcd = Gauge("modelpool_gateway_etcd_connected", "1 while the etcd watches are connected", registry=r)
        self.ejected = Gauge("modelpool_gateway_ejected_instances", "Instances ejected now", registry=r)

    def bind(self, gw: Gateway) -> None:
        """Read live values from the gateway at scrape time."""
        self.in_flight.set_function(lambda: gw.forwarder.in_flight.total if gw.forwarder else 0)
        self.retries.set_function(lambda: gw.forwarder.retries if gw.forwarder else 0)
        self.etcd.set_function(lambda: 1.0 if gw.etcd_connected else 0.0)
        self.ejected.set_function(lambda: gw.ejections.count_ejected())
        self._gw = gw

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(model, route, str(status)).inc()
        self.duration.labels(model, route).observe(seconds)

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
