"""`ctl agent` as a Kubernetes pod and on a CPU host: real agent process, sim engine, real etcd.

KUBERNETES_SERVICE_HOST only tells the agent it is in a pod (it never calls the API server), so
the test sets it with the downward-API variables a pod gets (ops/k8s/base/model.yaml).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.netutil import free_port
from controlplane.pb import InstanceRecord, InstanceState, NodeRecord
from controlplane.procs import spawn
from controlplane.store import EtcdStore
from tests.cluster import CTL, eventually, exit_code, start_gateway, stop_all

POD = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1", "POD_NAME": "model-tiny-7d9f-x2k4q",
       "POD_NAMESPACE": "pool", "NODE_NAME": "gpu-node-3", "POD_IP": "127.0.0.1",
       # a pod has no Slurm job, whatever leaks into its environment
       "SLURM_JOB_ID": "4242", "SLURM_JOB_USER": "someone"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "KUBERNETES_", "POD_"))}
    return {**env, **extra}


def _engine_environ(port: int) -> list[bytes]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"agent.sim" in argv and str(port).encode() in argv:
                    return (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
    raise AssertionError(f"no sim engine on port {port}")


async def test_pod_agent_on_cpu_uses_pod_facts_port_range_and_drains_on_sigterm(
        store: EtcdStore, etcd_server: EtcdProcess, tmp_path: Path) -> None:
    low = free_port()
    ports = (low, min(low + 9, 65535))
    argv = [*CTL, "agent", "--etcd", etcd_server.endpoint, "--etcd-prefix", store.prefix, "--serve", "m-k8s",
            "--engine", "sim", "--cpu", "--engine-port-range", f"{ports[0]}-{ports[1]}", "--drain-grace", "10",
            "--lease-ttl", "5", "--sim-option", "tokens_per_s=20", "--log-dir", str(tmp_path / "engines")]
    log = tmp_path / "agent.log"
    agent = spawn(argv, log, env=_env(**POD))
    procs = [agent]
    keys = Keys(store.prefix)
    try:
        async def ready() -> InstanceRecord | None:
            kvs, _ = await store.list_prefix(keys.instances)
            recs = [decode(InstanceRecord, kv) for kv in kvs]
            return next((r for r in recs if r.state == InstanceState.READY), None)
        rec = await eventually(ready, timeout=30, what="a READY instance")
        node_kv = await store.get(keys.node(POD["POD_NAME"]))
        assert node_kv is not None, "node id is not the pod name"
        node = decode(NodeRecord, node_kv)
        assert not node.HasField("slurm") and node.end_time_unix == 0
        assert node.labels["platform"] == "kubernetes" and node.labels["k8s_node"] == "gpu-node-3"
        assert list(node.gpus) == [] and rec.gpu_type == "CPU" and list(rec.gpu_indices) == []
        port = int(rec.endpoint.rsplit(":", 1)[1])
        assert rec.endpoint.startswith("http://127.0.0.1:") and ports[0] <= port <= ports[1]
        assert not any(v.startswith(b"CUDA_VISIBLE_DEVICES=") for v in _engine_environ(port))
        # the engine's own model card travels: agent -> InstanceRecord -> gateway /v1/models
        assert rec.max_model_len == 8192 and rec.model_root == "m-k8s"
        gateway, gw_url = start_gateway(etcd_server.endpoint, store.prefix, tmp_path, "--no-auth")
        procs.append(gateway)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gw_url}/v1/models/m-k8s") as resp:
                card = await resp.json()
            assert (card["max_model_len"], card["root"], card["parent"]) == (8192, "m-k8s", None)

            # SIGTERM with a stream in flight: it finishes, then the agent exits within the grace period
            body = {"model": "m-k8s", "prompt": "x", "max_tokens": 30, "stream": True}  # ~1.5 s at 20 tokens/s
            async with http.post(f"{gw_url}/v1/completions", json=body) as resp:
                first = await resp.content.readany()
                sent = time.monotonic()
                agent.send_signal(signal.SIGTERM)
                rest = await resp.content.read()
        assert (first + rest).endswith(b"data: [DONE]\n\n") and b'"finish_reason": "length"' in first + rest
        assert await exit_code(agent, 30, log) == 0
        assert time.monotonic() - sent < 10 + 5 + 15  # drain grace + DRAINING confirmed + engine stop
        assert (await store.list_prefix(keys.instances))[0] == []
        assert await store.get(keys.node(POD["POD_NAME"])) is None
    finally:
        stop_all(procs)


async def test_without_gpus_the_agent_points_at_cpu_mode(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    out = await asyncio.to_thread(
        subprocess.run, [*CTL, "agent", "--etcd", etcd_server.endpoint, "--serve", "m", "--engine", "sim"],
        capture_output=True, text=True, timeout=60, env=_env(PATH="/usr/bin:/bin"), check=False)
    assert out.returncode == 2 and "--cpu" in out.stderr, out.stderr
    out = await asyncio.to_thread(
        subprocess.run, [*CTL, "agent", "--etcd", etcd_server.endpoint, "--serve", "m@2", "--engine", "sim", "--cpu"],
        capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert out.returncode == 2 and "no GPUs to count" in out.stderr, out.stderr
    out = await asyncio.to_thread(
        subprocess.run, [*CTL, "agent", "--etcd", etcd_server.endpoint, "--serve", "m", "--engine", "sim",
                         "--cpu", "--engine-port-range", "9000-8000"],
        capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert out.returncode == 2 and "LOW <= HIGH" in out.stderr, out.stderr
