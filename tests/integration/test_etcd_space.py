"""etcd space: the etcd of `ctl dev` and of the tests compacts itself and has a quota; gateways and
`ctl status` show the database size and warn near the quota; demand reaches the planner and
`ctl status` from the gateways' records."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import orjson

from controlplane.cli.dev import DevCluster
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import Demand, GatewayRecord
from controlplane.planner.live import read_live
from controlplane.store import EtcdConfig, EtcdStore, StoreError
from gateway.app import GatewayConfig
from gateway.fleet import FleetSettings
from tests.cluster import CTL, eventually, gateway_in_process


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_ctl_dev_and_the_test_etcd_run_with_auto_compaction_and_a_quota(etcd_server: EtcdProcess,
                                                                        tmp_path: Path) -> None:
    dev = DevCluster(workdir=tmp_path, gateway_port=0, models=())
    dev.start_etcd(None)
    try:
        for proc in (dev.etcd.proc if dev.etcd else None, etcd_server.proc):
            assert proc is not None
            args = _cmdline(proc.pid)
            flags = dict(zip(args[::1], args[1:], strict=False))  # noqa: RUF007
            assert flags["--auto-compaction-mode"] == "periodic"
            assert flags["--auto-compaction-retention"] == "5m"
            assert int(flags["--quota-backend-bytes"]) == 2 * 1024**3
    finally:
        if dev.etcd is not None:
            dev.etcd.stop()


async def test_auto_compaction_really_compacts_history(tmp_path: Path) -> None:
    etcd = EtcdProcess.in_temp_dir(compaction_retention="1s").start()
    try:
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix="/c")).connect()
        first = await store.put("/c/k", b"0")
        for i in range(20):
            await store.put("/c/k", str(i).encode())

        async def compacted() -> bool:
            await store.put("/c/tick", b"")
            try:
                await store.list_prefix("/c/", revision=first)
            except StoreError as exc:
                return "compacted" in str(exc)
            return False

        await eventually(compacted, timeout=15, interval=0.5, what="old revisions compacted by etcd itself")
        await store.close()
    finally:
        etcd.stop()


async def test_gateway_and_ctl_status_show_the_db_size_and_warn_near_the_quota(store: EtcdStore,
                                                                               etcd_server: EtcdProcess) -> None:
    st = await store.member_status()
    assert st.db_size_bytes > 0 and 0 < st.db_size_in_use_bytes <= st.db_size_bytes and not st.alarms
    cfg = GatewayConfig(etcd=store.config, auth=False, fleet=FleetSettings(lease_ttl_s=4),
                        etcd_quota_bytes=st.db_size_bytes, etcd_space_interval_s=0.2)   # "full"
    async with gateway_in_process(cfg) as (gw, url), aiohttp.ClientSession() as http:
        await eventually(lambda: _warned(gw), what="space warning")
        async with http.get(f"{url}/readyz") as r:
            body = await r.json()
        assert body["etcd_db"]["size_bytes"] >= st.db_size_bytes and body["etcd_db"]["quota_bytes"] == st.db_size_bytes
        assert body["warnings"] and "of its" in body["warnings"][0] and "quota" in body["warnings"][0]
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert "modelpool_gateway_etcd_space_warning 1.0" in text
        assert f"modelpool_gateway_etcd_quota_bytes {float(st.db_size_bytes)}" in text
        assert "modelpool_gateway_etcd_db_size_bytes" in text
        # a demand record reaches ctl status through the gateway record
        await store.put(Keys(store.prefix).gateway("other"), GatewayRecord(
            gateway_id="other", demand=[Demand(model="m1", requests_per_second=2.5, in_flight=3)]).SerializeToString())
        base = [*CTL, "status", "--etcd", etcd_server.endpoint, "--etcd-prefix", store.prefix]
        out = await asyncio.to_thread(subprocess.run, [*base, "-o", "json"], capture_output=True, text=True,
                                      timeout=60)
        assert out.returncode == 0, out.stderr
        data = orjson.loads(out.stdout)
        assert data["etcd"]["db_size_bytes"] > 0 and data["etcd"]["warning"] is None      # 2 GiB: far away
        (m1,) = [m for m in data["models"] if m["model"] == "m1"]
        assert (m1["requests_per_second"], m1["in_flight"]) == (2.5, 3)
        out = await asyncio.to_thread(subprocess.run, [*base, "--etcd-quota", "1KiB"], capture_output=True,
                                      text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "DB SIZE" in out.stdout and "warning: etcd database is" in out.stdout
        out = await asyncio.to_thread(subprocess.run, [*base, "--etcd-quota", "lots"], capture_output=True,
                                      text=True, timeout=60)
        assert out.returncode == 2 and "KiB/MiB/GiB" in out.stderr


async def _warned(gw: object) -> bool:
    space = getattr(gw, "etcd_space", None)
    return space is not None and space.warning is not None


async def test_the_planner_reads_demand_from_gateway_records_and_legacy_records(store: EtcdStore) -> None:
    keys = Keys(store.prefix)
    await store.put(keys.gateway("g1"), GatewayRecord(gateway_id="g1", updated_unix_ms=5, demand=[
        Demand(model="m1", requests_per_second=1.5), Demand(model="m2", requests_per_second=0.5)]).SerializeToString())
    await store.put(keys.demand_entry("m1", "old-gw"), Demand(model="m1", gateway_id="old-gw",
                                                              requests_per_second=2.0).SerializeToString())
    live = await read_live(store, keys)
    got = sorted((d.model, d.gateway_id, d.requests_per_second, d.updated_unix_ms) for d in live.demand)
    assert got == [("m1", "g1", 1.5, 5), ("m1", "old-gw", 2.0, 0), ("m2", "g1", 0.5, 5)]
