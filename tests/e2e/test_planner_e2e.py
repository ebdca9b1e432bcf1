"""The planner end to end: etcd + 2 pool agents (sim engines) + a gateway, driven only by `ctl`.

    ctl models apply (2 models) ─▶ ctl apply --auto-approve ─▶ desired/<node>/<id>
        ─▶ agents start sim engines ─▶ gateway routes chat to both models
    ctl models apply --prune (1 model) ─▶ ctl apply --auto-approve ─▶ STOP
        ─▶ that engine drains and exits ─▶ the model leaves /v1/models
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import Assignment, InstanceRecord, InstanceState
from controlplane.procs import spawn
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, eventually, instances_prefix, nodes_prefix, start_gateway, stop_all, tenant_keys

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "examples" / "cluster.yaml"


async def ctl(endpoint: str, prefix: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CTL, *args, "--etcd", endpoint, "--etcd-prefix", prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _chat(base: str, model: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 5}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.loads(resp.read()))


async def gateway_models(base: str) -> set[str]:
    data = await asyncio.to_thread(_get_json, f"{base}/v1/models")
    return {m["id"] for m in data.get("data", [])}


def catalog(path: Path, models: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"models": [
        {"name": m, "engine": "sim", "weight_memory_gib": 8, "kv_memory_gib": 2, "min_replicas": 1}
        for m in models]}), encoding="utf-8")
    return path


async def test_plan_apply_starts_engines_routes_both_models_then_stops_a_removed_one(
    etcd_server: EtcdProcess, etcd_prefix: str, tmp_path: Path
) -> None:
    ep, prefix = etcd_server.endpoint, etcd_prefix
    keys = Keys(prefix)
    procs = []
    try:
        for node in ("pool-a", "pool-b"):
            procs.append(spawn([*CTL, "agent", "--etcd", ep, "--etcd-prefix", prefix, "--pool", "--engine", "sim",
                                "--gpus", "2xA100-80GB", "--node-id", node, "--drain-grace", "5",
                                "--sim-option", "ttft_ms=5", "--log-dir", str(tmp_path / "engines")],
                               tmp_path / f"agent-{node}.log"))
        gw, base = start_gateway(ep, prefix, tmp_path, "--no-auth")
        procs.append(gw)
        store = await EtcdStore(EtcdConfig(endpoints=(ep,), prefix=prefix, timeout_s=3.0)).connect()
        try:
            async def pool_nodes() -> int:
                kvs, _ = await store.list_prefix(nodes_prefix(prefix))
                return len(kvs) == 2
            await eventually(pool_nodes, timeout=20, what="both pool agents registered")

            code, _, err = await ctl(ep, prefix, "models", "apply", "-f", str(catalog(tmp_path / "c.yaml",
                                                                                   ["chat-a", "chat-b"])))
            assert code == 0, err
            code, out, err = await ctl(ep, prefix, "apply", "--auto-approve", "--cluster", str(CLUSTER_FILE),
                                       "-o", "json")
            assert code == 0, err
            assert json.loads(out)["applied"]["started"] == 2

            async def both_routed() -> bool:
                return await gateway_models(base) >= {"chat-a", "chat-b"}
            await eventually(both_routed, timeout=30, interval=0.2, what="gateway lists both models")
            for model in ("chat-a", "chat-b"):
                answer = await asyncio.to_thread(_chat, base, model)
                assert answer["model"] == model and answer["choices"][0]["message"]["content"]

            # every running instance belongs to an assignment of the applied plan
            kvs, _ = await store.list_prefix(instances_prefix(prefix))
            instances = [decode(InstanceRecord, kv) for kv in kvs]
            dkvs, _ = await store.list_prefix(keys.desired)
            wanted = {decode(Assignment, kv).assignment_id: decode(Assignment, kv).model for kv in dkvs}
            assert {(i.assignment_id, i.model) for i in instances} == set(wanted.items())
            assert all(i.state == InstanceState.READY for i in instances)

            # a replan of the converged pool changes nothing
            code, _, err = await ctl(ep, prefix, "plan", "--cluster", str(CLUSTER_FILE))
            assert code == 0, err

            # chat-b leaves the catalog: the next apply stops it and the gateway drops it
            code, _, err = await ctl(ep, prefix, "models", "apply", "--prune", "-f",
                                     str(catalog(tmp_path / "c.yaml", ["chat-a"])))
            assert code == 0, err
            code, out, err = await ctl(ep, prefix, "apply", "--auto-approve", "--cluster", str(CLUSTER_FILE),
                                       "-o", "json")
            assert code == 0, err
            applied = json.loads(out)["applied"]
            assert (applied["stopped"], applied["kept"], applied["started"]) == (1, 1, 0)

            async def b_gone() -> bool:
                kvs, _ = await store.list_prefix(instances_prefix(prefix))
                models = await gateway_models(base)
                return "chat-b" not in models and "chat-a" in models and all(
                    decode(InstanceRecord, kv).model == "chat-a" for kv in kvs)
            await eventually(b_gone, timeout=30, interval=0.2, what="chat-b stopped and unrouted")
            answer = await asyncio.to_thread(_chat, base, "chat-a")
            assert answer["model"] == "chat-a"
        finally:
            await store.close()
    finally:
        stop_all(procs)
    for node in ("pool-a", "pool-b"):
        log = (tmp_path / f"agent-{node}.log").read_text()
        assert "Traceback" not in log, log[-3000:]


async def test_planner_daemon_converges_within_its_churn_cap_and_gives_up_leadership_on_sigterm(
    etcd_server: EtcdProcess, etcd_prefix: str, tmp_path: Path
) -> None:
    ep, prefix = etcd_server.endpoint, etcd_prefix
    keys = Keys(prefix)
    agent = spawn([*CTL, "agent", "--etcd", ep, "--etcd-prefix", prefix, "--pool", "--engine", "sim",
                   "--gpus", "2xA100-80GB", "--node-id", "pool-d", "--drain-grace", "5", "--sim-option", "ttft_ms=5",
                   "--log-dir", str(tmp_path / "engines")], tmp_path / "agent.log")
    daemon = None
    store = await EtcdStore(EtcdConfig(endpoints=(ep,), prefix=prefix, timeout_s=3.0)).connect()
    try:
        await eventually(lambda: store.get(tenant_keys(prefix).node("pool-d")), timeout=20,
                         what="pool agent registered")
        code, _, err = await ctl(ep, prefix, "models", "apply", "-f",
                                 str(catalog(tmp_path / "c.yaml", ["daemon-a", "daemon-b"])))
        assert code == 0, err
        daemon = spawn([*CTL, "planner", "run", "--etcd", ep, "--etcd-prefix", prefix, "--cluster", str(CLUSTER_FILE),
                        "--interval", "1", "--max-churn", "1", "--lease-ttl", "5", "--id", "daemon-under-test"],
                       tmp_path / "planner.log")

        async def assignments() -> list[Assignment]:
            kvs, _ = await store.list_prefix(keys.desired)
            return [decode(Assignment, kv) for kv in kvs]

        seen: list[int] = []

        async def converged() -> bool:
            current = await assignments()
            if not seen or seen[-1] != len(current):
                seen.append(len(current))
            kvs, _ = await store.list_prefix(instances_prefix(prefix))
            ready = {decode(InstanceRecord, kv).model for kv in kvs
                     if decode(InstanceRecord, kv).state == InstanceState.READY}
            return ready == {"daemon-a", "daemon-b"}
        await eventually(converged, timeout=40, interval=0.1, what="daemon placed both models")
        assert 1 in seen, f"a churn cap of 1 adds one assignment per round, saw counts {seen}"
        leader = await store.get(keys.planner_leader)
        assert leader is not None and leader.value.decode().startswith("daemon-under-test")

        daemon.terminate()
        assert await asyncio.to_thread(daemon.wait, 15) == 0
        assert await store.get(keys.planner_leader) is None  # the lease was revoked: leadership free at once
        assert len(await assignments()) == 2  # stopping the planner leaves the pool as it is
    finally:
        await store.close()
        stop_all([p for p in (daemon, agent) if p is not None])
    log = (tmp_path / "planner.log").read_text()
    assert "Traceback" not in log, log[-3000:]
