"""`ctl agent` as a real process against real etcd, with the sim engine."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import decode
from controlplane.pb import InstanceRecord, InstanceState, NodeRecord
from controlplane.store import Changes, EtcdConfig, EtcdStore, watch_prefix
from tests.cluster import eventually, exit_code, instances_prefix, start_agent, stop_all, tenant_keys


async def instances(store: EtcdStore) -> list[InstanceRecord]:
    kvs, _ = await store.list_prefix(instances_prefix(store.prefix))
    return [decode(InstanceRecord, kv) for kv in kvs]


async def ready_instance(store: EtcdStore, timeout: float = 20.0) -> InstanceRecord:
    async def check() -> InstanceRecord | None:
        return next((r for r in await instances(store) if r.state == InstanceState.READY), None)
    return await eventually(check, timeout=timeout, what="a READY instance")


async def test_registers_then_drains_in_order_on_sigterm(store: EtcdStore, etcd_server: EtcdProcess,
                                                          tmp_path: Path) -> None:
    proc, log = start_agent(etcd_server.endpoint, store.prefix, tmp_path, "m1", "n1", "--lease-ttl", "5",
                            "--drain-grace", "10", "--sim-option", "tokens_per_s=20")
    try:
        rec = await ready_instance(store)
        node_kv = await store.get(tenant_keys(store.prefix).node("n1"))
        assert node_kv is not None and node_kv.lease != 0
        node = decode(NodeRecord, node_kv)
        assert [g.type for g in node.gpus] == ["SIM-24GB"] and node.free_gpu_indices == []
        inst_kv = (await store.list_prefix(instances_prefix(store.prefix)))[0][0]
        assert inst_kv.lease == node_kv.lease  # one lease per agent
        assert rec.endpoint.startswith("http://127.0.0.1:") and rec.gpu_indices == [0]

        # a long stream is in flight when the drain starts: it must finish completely
        async with aiohttp.ClientSession() as http:
            body = {"model": "m1", "prompt": "x", "max_tokens": 30, "stream": True}  # ~1.5 s at 20 tok/s
            seen: list[tuple[str, int]] = []

            async def watch() -> None:
                async for update in watch_prefix(store, instances_prefix(store.prefix)):
                    if isinstance(update, Changes):
                        for ch in update.changes:
                            seen.append(("put", decode(InstanceRecord, ch.kv).state) if ch.kv else ("delete", 0))
                            if ch.kv is None:
                                return

            watcher = asyncio.create_task(watch())
            async with http.post(rec.endpoint + "/v1/completions", json=body) as resp:
                first = await resp.content.readany()
                assert first.startswith(b"data: ")
                drain_started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = await resp.content.read()
            assert (first + rest).endswith(b"data: [DONE]\n\n")
            assert b'"finish_reason": "length"' in first + rest
            await asyncio.wait_for(watcher, 20)
        assert seen[0] == ("put", InstanceState.DRAINING) and seen[-1] == ("delete", 0), seen
        assert await exit_code(proc, 20, log) == 0
        assert time.monotonic() - drain_started < 15
        assert await store.get(tenant_keys(store.prefix).node("n1")) is None
        assert await instances(store) == []
        assert "lease revoked" in log.read_text()
    finally:
        stop_all([proc])


async def test_crashed_engine_is_marked_failed_and_restarted(store: EtcdStore, etcd_server: EtcdProcess,
                                                             tmp_path: Path) -> None:
    proc, _ = start_agent(etcd_server.endpoint, store.prefix, tmp_path, "m2", "n2", "--sim-option", "crash_after=1")
    try:
        first = await ready_instance(store)
        async with aiohttp.ClientSession() as http:
            body = {"model": "m2", "prompt": "x", "max_tokens": 1}
            async with http.post(first.endpoint + "/v1/completions", json=body) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.post(first.endpoint + "/v1/completions", json=body) as r:
                    await r.read()

        async def failed() -> InstanceRecord | None:
            return next((r for r in await instances(store) if r.state == InstanceState.FAILED), None)

        rec = await eventually(failed, timeout=10, what="FAILED state")
        assert rec.restarts == 1 and "status 70" in rec.last_error

        async def restarted() -> InstanceRecord | None:
            return next((r for r in await instances(store)
                         if r.state == InstanceState.READY and r.restarts == 1), None)

        again = await eventually(restarted, timeout=20, what="READY after restart")
        assert again.instance_id == first.instance_id and again.endpoint != first.endpoint
    finally:
        stop_all([proc])


async def test_reregisters_after_etcd_outage_and_keeps_serving(tmp_path: Path) -> None:
    etcd = EtcdProcess.in_temp_dir().start()
    prefix = f"/mp-outage-{uuid.uuid4().hex[:6]}"
    config = EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix, timeout_s=2.0)
    store = await EtcdStore(config).connect()
    proc, log = start_agent(etcd.endpoint, prefix, tmp_path, "m3", "n3", "--lease-ttl", "3")
    try:
        rec = await ready_instance(store)
        await store.close()
        etcd.kill()
        await asyncio.sleep(5)  # longer than the TTL: the lease is gone when etcd returns
        # Engines keep serving while etcd is down.
        async with aiohttp.ClientSession() as http, http.post(
                rec.endpoint + "/v1/completions", json={"model": "m3", "prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
        assert proc.poll() is None
        etcd.restart()
        back = time.monotonic()
        store = await EtcdStore(config).connect()
        again = await ready_instance(store, timeout=30)
        assert again.instance_id == rec.instance_id and again.endpoint == rec.endpoint
        assert await store.get(tenant_keys(prefix).node("n3")) is not None
        assert time.monotonic() - back < 20
    finally:
        stop_all([proc])
        await store.close()
        etcd.stop()
    assert "lease lost" in log.read_text() or "lease granted" in log.read_text()


def test_bad_flags_exit_2(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    import subprocess
    import sys
    base = [sys.executable, "-m", "controlplane.cli.main", "agent", "--etcd", etcd_server.endpoint]
    for extra, needle in ((["--serve", "m", "--engine", "nope", "--gpus", "1xA100-80GB"], "unknown engine"),
                          (["--serve", "m", "--engine", "sim", "--gpus", "1xA100-80GB", "--sim-option", "bad"],
                           "KEY=VALUE"),
                          (["--serve", "m@3", "--engine", "sim", "--gpus", "2xA100-80GB"], "asks for 3 GPUs")):
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (extra, out.stderr)
        assert needle in out.stderr, out.stderr
