"""Merging several workers' Prometheus texts into one, each sample labelled with its worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.worker_metrics import merge_exposition


def worker_text(requests: int, latency: float, in_flight: int) -> str:
    r = CollectorRegistry()
    Counter("gw_requests", "Requests", ["model"], registry=r).labels("m").inc(requests)
    Histogram("gw_latency_seconds", "Latency", buckets=(0.1, 1.0), registry=r).observe(latency)
    Gauge("gw_in_flight", "In flight", registry=r).set(in_flight)
    return generate_latest(r).decode()


def test_merge_keeps_every_series_once_per_worker_and_stays_valid_exposition() -> None:
    merged = merge_exposition({"0": worker_text(3, 0.05, 2), "1": worker_text(4, 0.5, 1)}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert families["gw_requests"].type == "counter" and families["gw_latency_seconds"].type == "histogram"
    totals = {s.labels["worker"]: s.value for s in families["gw_requests"].samples if s.name == "gw_requests_total"}
    assert totals == {"0": 3.0, "1": 4.0}
    gauges = {s.labels["worker"]: s.value for s in families["gw_in_flight"].samples}
    assert gauges == {"0": 2.0, "1": 1.0}
    le = {(s.labels["worker"], s.labels["le"]): s.value for s in families["gw_latency_seconds"].samples
          if s.name == "gw_latency_seconds_bucket"}
    assert le[("0", "0.1")] == 1.0 and le[("1", "0.1")] == 0.0 and le[("1", "1.0")] == 1.0
    assert merged.count("# TYPE gw_requests_total counter") == 1  # one header per family
