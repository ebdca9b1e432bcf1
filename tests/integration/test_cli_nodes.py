"""`ctl nodes` against a real etcd and real `ctl agent` processes (sim engine).

The CLI runs its own event loop (run_async), so each invocation runs in a worker thread while the
test's loop keeps the `store` fixture for checking what landed in etcd.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

import controlplane.cli.nodes  # noqa: F401  (registers `ctl nodes`)
from controlplane.cli.common import ExitCode
from controlplane.cli.main import app
from controlplane.cli.nodes import NodesSnapshot, drain_progress, drain_state, ends_in, gpu_summary
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import Assignment, Gpu, InstanceRecord, InstanceState, ModelSpec, NodeControl, NodeRecord, SlurmJob
from controlplane.procs import spawn
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, eventually, exit_code, instances_prefix, start_agent, stop_all, tenant_keys


async def ctl(config: EtcdConfig, *args: str) -> Result:
    """Run `ctl ARGS --etcd ... --etcd-prefix ...` in a thread (the CLI starts its own loop)."""
    argv = [*args, "--etcd", ",".join(config.endpoints), "--etcd-prefix", config.prefix]
    return await asyncio.to_thread(CliRunner().invoke, app, argv, catch_exceptions=False)


async def list_json(config: EtcdConfig) -> dict[str, dict[str, Any]]:
    res = await ctl(config, "nodes", "list", "-o", "json")
    assert res.exit_code == 0, res.output
    return {v["node_id"]: v for v in json.loads(res.stdout)}


async def instances(store: EtcdStore) -> list[InstanceRecord]:
    kvs, _ = await store.list_prefix(instances_prefix(store.prefix))
    return [decode(InstanceRecord, kv) for kv in kvs]


async def node(store: EtcdStore, node_id: str) -> NodeRecord | None:
    kv = await store.get(tenant_keys(store.prefix).node(node_id))
    return decode(NodeRecord, kv) if kv else None


async def ready(store: EtcdStore, timeout: float = 20.0) -> InstanceRecord:
    async def check() -> InstanceRecord | None:
        return next((r for r in await instances(store) if r.state == InstanceState.READY), None)
    return await eventually(check, timeout=timeout, what="a READY instance")


# -- pure helpers -----------------------------------------------------------------------------------


def test_drain_progress() -> None:
    inst = InstanceRecord(instance_id="i1", model="m", node_id="n1")
    up, draining = NodeRecord(node_id="n1"), NodeRecord(node_id="n1", draining=True)
    assert drain_progress("n1", NodesSnapshot(1, {"n1": up}, [inst], {})) == (False, 1)
    assert drain_progress("n1", NodesSnapshot(1, {"n1": draining}, [inst], {})) == (False, 1)
    assert drain_progress("n1", NodesSnapshot(1, {"n1": up}, [], {})) == (False, 0)  # not acknowledged yet
    assert drain_progress("n1", NodesSnapshot(1, {"n1": draining}, [], {})) == (True, 0)
    assert drain_progress("n1", NodesSnapshot(1, {}, [], {})) == (True, 0)  # a serve agent that exited


def test_ends_in_and_summaries() -> None:
    now = 1_800_000_000.0
    assert [ends_in(int(now) + d, now) for d in (0, 45, 600, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == \
        ["ended", "45s", "10m", "3h05m", "2d4h"]
    assert ends_in(0, now) == "-"
    assert gpu_summary(["H100", "A100", "H100"]) == "1xA100,2xH100" and gpu_summary([]) == "-"
    ctl_rec = NodeControl(node_id="n", drain=True)
    assert drain_state(None, ctl_rec) == "requested"
    assert drain_state(NodeRecord(draining=True), None) == "yes"
    assert drain_state(NodeRecord(), NodeControl(drain=False)) == "no"


# -- against etcd, without agents -------------------------------------------------------------------


async def test_list_and_show_render_slurm_node_and_unknown_node_is_refused(etcd_config: EtcdConfig,
                                                                          store: EtcdStore) -> None:
    keys = Keys(store.prefix)
    end = int(time.time()) + 2 * 3600 + 600
    rec = NodeRecord(node_id="gpu017-job42", hostname="gpu017", address="10.0.0.17", pool=True,
                     gpus=[Gpu(index=i, type="A100-80GB") for i in range(4)] + [Gpu(index=4, type="H100")],
                     free_gpu_indices=[2, 3], end_time_unix=end, started_unix_ms=int(time.time() * 1000) - 90_000,
                     slurm=SlurmJob(job_id="42", partition="gpu-long", user="alice", end_time_unix=end),
                     labels={"rack": "r7"})
    await store.put(keys.node(rec.node_id), rec.SerializeToString())
    await store.put(keys.instance("m/x", "i1"), InstanceRecord(instance_id="i1", model="m/x", node_id=rec.node_id,
                                                                 state=InstanceState.READY).SerializeToString())

    res = await ctl(etcd_config, "nodes", "list")
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if "gpu017-job42" in line)
    for cell in ("4xA100-80GB,1xH100", "42", "gpu-long", "2h", "pool", "no", "1: m/x", "1m"):
        assert cell in row, (cell, row)
    header = res.stdout.splitlines()[1]
    assert header.split()[:4] == ["NODE", "GPUS", "FREE", "SLURM"], header

    view = (await list_json(etcd_config))["gpu017-job42"]
    assert view["free_gpus"] == 2 and view["slurm_job_id"] == "42" and view["partition"] == "gpu-long"
    assert view["end_time_unix"] == end and view["mode"] == "pool" and view["draining"] == "no"
    assert [i["instance_id"] for i in view["instances"]] == ["i1"]

    shown = await ctl(etcd_config, "nodes", "show", "gpu017-job42")
    assert shown.exit_code == 0 and "rack=r7" in shown.stdout and "partition gpu-long user alice" in shown.stdout

    # unknown node: refused with NOT_FOUND, nothing written; --force pre-drains it
    for cmd in (("nodes", "drain", "ghost"), ("nodes", "show", "ghost")):
        res = await ctl(etcd_config, *cmd)
        assert res.exit_code == ExitCode.NOT_FOUND, res.output
        assert "no node 'ghost'" in res.stderr
    assert await store.get(keys.node_control("ghost")) is None
    res = await ctl(etcd_config, "nodes", "drain", "ghost", "--force", "--reason", "bad PSU")
    assert res.exit_code == 0 and "not registered" in res.stdout
    control = decode(NodeControl, await store.get(keys.node_control("ghost")))  # type: ignore[arg-type]
    assert control.drain and control.reason == "bad PSU" and "@" in control.requested_by
    ghost = (await list_json(etcd_config))["ghost"]
    assert ghost["registered"] is False and ghost["draining"] == "requested"
    assert ghost["drain_request"]["reason"] == "bad PSU"
    assert "requested (not registered)" in (await ctl(etcd_config, "nodes", "list")).stdout
    res = await ctl(etcd_config, "nodes", "undrain", "ghost")
    assert res.exit_code == 0 and "removed" in res.stdout
    assert await store.get(keys.node_control("ghost")) is None
    assert "ghost" not in await list_json(etcd_config)
    res = await ctl(etcd_config, "nodes", "undrain", "ghost")
    assert res.exit_code == 0 and "no drain request" in res.stdout


# -- with real agents -------------------------------------------------------------------------------


async def test_drain_pool_node_stops_assignments_and_undrain_resumes(etcd_config: EtcdConfig, etcd_server: EtcdProcess,
                                                                      store: EtcdStore, tmp_path: Path) -> None:
    keys = Keys(store.prefix)
    await store.put(keys.model("pm"), ModelSpec(name="pm", engine="sim").SerializeToString())
    argv = [*CTL, "agent", "--etcd", etcd_server.endpoint, "--etcd-prefix", store.prefix, "--pool", "--engine", "sim",
            "--gpus", "2xSIM-24GB", "--node-id", "p1", "--lease-ttl", "3", "--drain-grace", "5",
            "--log-dir", str(tmp_path / "engine-logs")]
    log = tmp_path / "agent-p1.log"
    proc = spawn(argv, log)
    try:
        # assign once the node is registered, as the planner would (it places only on registered nodes)
        await eventually(lambda: node(store, "p1"), timeout=15, what="pool node registered")
        # desired/ is keyed by the node's ref: <tenant>/<node id> (the agent's tenant: "default")
        await store.put(keys.assignment("default/p1", "a1"), Assignment(
            assignment_id="a1", node_id="default/p1", model="pm", tensor_parallel=1).SerializeToString())
        first = await ready(store)
        assert first.assignment_id == "a1"
        view = (await list_json(etcd_config))["default/p1"]
        assert view["mode"] == "pool" and view["gpus"] == "2xSIM-24GB" and view["free_gpus"] == 1
        assert [i["state"] for i in view["instances"]] == ["READY"]

        res = await ctl(etcd_config, "nodes", "drain", "p1", "--reason", "maintenance", "--wait", "--timeout", "30")
        assert res.exit_code == 0 and "node default/p1 drained" in res.stdout, res.output
        assert not await instances(store)  # --wait returned only once the assignment had stopped

        async def drained() -> bool:
            rec = await node(store, "p1")
            return bool(rec and rec.draining and rec.free_gpu_indices == [0, 1] and not await instances(store))
        await eventually(drained, timeout=15, what="pool node draining with its assignment stopped")
        assert proc.poll() is None, "a pool-mode agent stays up while drained"
        assert (await list_json(etcd_config))["default/p1"]["draining"] == "yes"
        assert "maintenance" in (await ctl(etcd_config, "nodes", "show", "p1")).stdout

        res = await ctl(etcd_config, "nodes", "undrain", "p1")
        assert res.exit_code == 0 and "removed" in res.stdout
        again = await ready(store)
        assert again.assignment_id == "a1" and again.instance_id != first.instance_id
        rec = await node(store, "p1")
        assert rec is not None and not rec.draining
    finally:
        stop_all([proc])


async def test_drain_serve_agent_removes_instance_and_agent_exits_0(etcd_config: EtcdConfig, etcd_server: EtcdProcess,
                                                                     store: EtcdStore, tmp_path: Path) -> None:
    proc, log = start_agent(etcd_server.endpoint, store.prefix, tmp_path, "sm", "s1", "--lease-ttl", "3",
                            "--drain-grace", "5")
    try:
        await ready(store)
        res = await ctl(etcd_config, "nodes", "list")
        row = next(line for line in res.stdout.splitlines() if line.lstrip().startswith("default/s1"))
        assert "serve" in row and "1xSIM-24GB" in row and "1: sm" in row, row

        res = await ctl(etcd_config, "nodes", "drain", "s1", "--reason", "rebalance", "-o", "json",
                        "--wait", "--timeout", "30")
        assert res.exit_code == 0 and json.loads(res.stdout)["registered"] is True
        # --wait returned: the records are gone already, and the agent exits 0
        assert await instances(store) == [] and await node(store, "s1") is None
        assert await exit_code(proc, 20, log) == 0
        assert "ctl nodes drain: rebalance" in log.read_text()
        # the request stays (a restarted agent with this id would drain again) until undrained
        assert (await list_json(etcd_config))["default/s1"]["registered"] is False
        assert (await ctl(etcd_config, "nodes", "undrain", "s1")).exit_code == 0
        assert await list_json(etcd_config) == {}
    finally:
        stop_all([proc])
