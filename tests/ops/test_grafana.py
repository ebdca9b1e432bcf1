"""ops/grafana: every metric that a dashboard query names is exported by a running pool.

The pool is real: etcd, `ctl agent` with a sim engine (vLLM's metric names), `ctl gateway`,
`ctl exporter`; after a little traffic the test scrapes the gateway, the exporter, etcd and the
engines that the exporter's http_sd lists, and looks up each name of each panel and variable.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.etcdproc import EtcdProcess
from controlplane.netutil import free_port
from controlplane.procs import spawn
from tests.cluster import CTL, eventually, start_agent, start_gateway, stop_all, wait_http
from tests.ops.promql import exported_names, metric_names

GRAFANA = Path(__file__).resolve().parents[2] / "ops" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and query variable."""
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((f"panel {sub['title']!r}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']!r}", query))
    return out


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (model, status) (rate(a_total{model=~"$model"}[$__rate_interval]))') == {"a_total"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(b_bucket[5m])))") == {"b_bucket"}
    assert metric_names('count(max by (m) (c) > 0) or vector(0)') == {"c"}
    assert metric_names("avg by (model) (vllm:kv_cache_usage_perc) / on (x) group_left d") == {
        "vllm:kv_cache_usage_perc", "d"}
    assert metric_names("label_values(e, model)") == {"e"}
    assert exported_names("# TYPE f counter\nf_total 1\n# TYPE g histogram\n") >= {"f_total", "g_bucket"}


def test_dashboards_and_provisioning_parse() -> None:
    assert DASHBOARDS
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] and queries(board)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "modelpool.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


@pytest.mark.timeout(120)
async def test_every_dashboard_metric_is_exported_by_a_running_pool(etcd_server: EtcdProcess, etcd_prefix: str,
                                                                    tmp_path: Path) -> None:
    endpoint = etcd_server.endpoint
    catalog = tmp_path / "models.yaml"
    catalog.write_text("models:\n  - {name: m1, engine: sim, weight_memory_gib: 0}\n"
                       "  - {name: unserved, engine: sim, weight_memory_gib: 0}\n")
    subprocess.run([*CTL, "models", "apply", "-f", str(catalog), "--etcd", endpoint, "--etcd-prefix", etcd_prefix],
                   check=True, capture_output=True, timeout=60)
    agent, _ = start_agent(endpoint, etcd_prefix, tmp_path, "m1", "n1", "--sim-option", "tokens_per_s=200")
    procs = [agent]
    try:
        gateway, gw_url = start_gateway(endpoint, etcd_prefix, tmp_path, "--no-auth")
        procs.append(gateway)
        port = free_port()
        exporter = spawn([*CTL, "exporter", "--etcd", endpoint, "--etcd-prefix", etcd_prefix, "--port", str(port)],
                         tmp_path / "exporter.log")
        procs.append(exporter)
        exporter_url = f"http://127.0.0.1:{port}"
        wait_http(f"{exporter_url}/healthz", exporter, log=tmp_path / "exporter.log")
        async with aiohttp.ClientSession() as http:
            async def routable() -> bool:
                async with http.get(f"{gw_url}/v1/models") as resp:
                    return any(m["id"] == "m1" for m in (await resp.json())["data"])
            await eventually(routable, timeout=30, what="m1 routable")
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            for stream in (True, False):
                async with http.post(f"{gw_url}/v1/chat/completions", json={**body, "stream": stream}) as resp:
                    assert resp.status == 200
                    await resp.read()
            async with http.post(f"{gw_url}/v1/chat/completions", json={**body, "model": "nope"}) as resp:
                assert resp.status == 404

        targets = json.loads(_get(f"{exporter_url}/sd/engines"))
        assert [t["labels"]["model"] for t in targets] == ["m1"]
        sources = {
            "gateway": _get(f"{gw_url}/metrics"),
            "exporter": _get(f"{exporter_url}/metrics"),
            "etcd": _get(f"http://{endpoint}/metrics"),
            **{f"engine {t['targets'][0]}": _get(f"{t['labels']['__scheme__']}://{t['targets'][0]}"
                                                 f"{t['labels']['__metrics_path__']}") for t in targets},
        }
    finally:
        stop_all(procs)
    exported = {source: exported_names(text) for source, text in sources.items()}
    everything = set().union(*exported.values())
    used: set[str] = set()
    missing = []
    for path in DASHBOARDS:
        for where, expr in queries(json.loads(path.read_text())):
            names = metric_names(expr)
            assert names, f"{path.name} {where}: no metric in {expr!r}"
            used |= names
            missing += [f"{path.name} {where}: {n}" for n in sorted(names - everything)]
    assert not missing, "\n".join(missing)
    for source, names in exported.items():  # each scraped part of the pool is on the dashboard
        assert used & names, f"no panel uses a metric of the {source}"
    assert 'modelpool_pool_model_ready_instances{model="unserved"} 0.0' in sources["exporter"]
