"""`ctl gateway --workers N` against a real etcd and real sim engines: N processes, one port.

Which process listens is read from /proc: a socket inode in LISTEN state on the gateway port
(/proc/net/tcp) that is also an open fd of the worker (/proc/<pid>/fd).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.netutil import free_port
from controlplane.procs import spawn
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, Sim, eventually, instance_record, start_gateway, stop_all

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux only)")


def child_pids(parent: int) -> set[int]:
    """Live (non-zombie) processes whose parent is ``parent``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inodes.add(cols[9])
    return inodes


def listens(pid: int, port: int) -> bool:
    """True when process ``pid`` holds a listening socket on ``port``."""
    wanted = listening_inodes(port)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in wanted:
            return True
    return False


async def wait_for(check, timeout: float = 15.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    async def probe():  # type: ignore[no-untyped-def]
        return check()
    return await eventually(probe, timeout=timeout, interval=0.05, what=what)


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Sim]]:
    tmp = tmp_path_factory.mktemp("gww")
    fast = Sim("wk", tmp, "--ttft-ms", "1", "--tokens-per-s", "0")
    slow = Sim("wk-slow", tmp, "--ttft-ms", "5", "--tokens-per-s", "20")
    yield fast, slow
    fast.stop()
    slow.stop()


@pytest.fixture
async def pool(etcd_server: EtcdProcess, sims: tuple[Sim, Sim]) -> AsyncIterator[str]:
    """A fresh prefix with both sims registered READY; yields the prefix."""
    prefix = f"/mp-gww-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    for sim in sims:
        rec = instance_record(sim.model, f"i-{sim.model}", sim.url)
        await store.put(keys.instance(sim.model, f"i-{sim.model}"), rec.SerializeToString())
    yield prefix
    await store.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per request: each request is a fresh accept, spread by the kernel over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


async def completes(http: aiohttp.ClientSession, url: str, model: str = "wk") -> bool:
    async with http.post(f"{url}/v1/chat/completions", json=chat(model)) as r:
        body = await r.read()
        return r.status == 200 and orjson.loads(body)["usage"]["completion_tokens"] == 4


async def all_workers_route(http: aiohttp.ClientSession, url: str, attempts: int = 40) -> bool:
    """Each worker loads its own table: ready once many fresh connections in a row all route."""
    for _ in range(attempts):
        async with http.get(f"{url}/v1/models/wk") as r:
            if r.status != 200:
                return False
    return True


def start(endpoint: str, prefix: str, tmp: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, int]:
    port = free_port()
    proc, url = start_gateway(endpoint, prefix, tmp, "--no-auth", "--workers", str(workers), port=port)
    return proc, url, port


async def test_workers_share_the_port_and_are_restarted(etcd_server, pool, http, tmp_path) -> None:
    proc, url, port = start(etcd_server.endpoint, pool, tmp_path, 2)
    try:
        workers = await wait_for(lambda: (lambda c: c if len(c) == 2 and all(listens(p, port) for p in c) else None)(
            child_pids(proc.pid)), what="two listening workers")
        assert not listens(proc.pid, port)  # the parent's anchor socket claims the port but never accepts
        await eventually(lambda: all_workers_route(http, url), what="every worker routes")
        results = await asyncio.gather(*(completes(http, url) for _ in range(40)))
        assert all(results)
        # One scrape, whichever worker takes it, shows every worker's series, labelled worker="i".
        for _ in range(4):
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{url}/metrics") as r:  # a new connection each
                served = {s.labels["worker"]: s.value
                          for f in text_string_to_metric_families(await r.text())
                          for s in f.samples if s.name == "modelpool_gateway_requests_total"
                          and s.labels["model"] == "wk" and s.labels["status"] == "200"}
            assert set(served) == {"0", "1"} and sum(served.values()) == 40, served

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # Reaped, not merely a zombie: the parent reaps once the whole process (every thread) is gone,
        # so its listening socket is closed; before that a new connection may still land in its queue.
        await wait_for(lambda: not Path(f"/proc/{victim}").exists(), what="killed worker reaped")
        # While its replacement starts, the survivor takes every connection.
        survivor_only = 0
        while len(child_pids(proc.pid)) < 2:
            t = time.time()
            try:
                ok = await completes(http, url)
            except aiohttp.ClientError as exc:
                raise AssertionError(f"request {survivor_only} at {t:.4f} failed: {exc!r}") from exc
            assert ok
            survivor_only += 1
        assert survivor_only > 0
        new = await wait_for(lambda: (lambda c: c if len(c) == 2 and all(listens(p, port) for p in c) else None)(
            child_pids(proc.pid)), what="replacement worker listening")
        assert victim not in new and (workers - {victim}) <= new
        await eventually(lambda: all_workers_route(http, url), what="replacement routes")
        assert all(await asyncio.gather(*(completes(http, url) for _ in range(20))))
        assert proc.poll() is None

        # SIGTERM to the parent alone: a stream in flight finishes, then every process exits cleanly.
        async def stream() -> bytes:
            async with http.post(f"{url}/v1/chat/completions", json=chat("wk-slow", max_tokens=10, stream=True)) as r:
                assert r.status == 200
                return await r.read()

        in_flight = asyncio.create_task(stream())
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        raw = await asyncio.wait_for(in_flight, 10)
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert not any(alive(p) for p in new)
    finally:
        stop_all([proc])


async def test_parent_killed_outright_takes_workers_down(etcd_server, pool, http, tmp_path) -> None:
    proc, _, _ = start(etcd_server.endpoint, pool, tmp_path, 2)
    try:
        workers = await wait_for(lambda: (lambda c: c if len(c) == 2 else None)(child_pids(proc.pid)),
                                 what="two workers")
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone; workers are in their own process group
        await wait_for(lambda: not any(alive(p) for p in workers), what="workers exit with their parent")
    finally:
        stop_all([proc])


def test_exits_unavailable_when_the_port_is_taken(etcd_server, tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        log = tmp_path / "gw.log"
        proc = spawn([*CTL, "gateway", "--etcd", etcd_server.endpoint, "--host", "127.0.0.1", "--port", str(port),
                      "--no-auth", "--workers", "2"], log)
        started = time.monotonic()
        code = proc.wait(timeout=30)
    assert code == 5, log.read_text()
    assert "cannot listen" in log.read_text()
    assert time.monotonic() - started < 30


async def test_a_fixed_id_names_each_worker_in_the_fleet(etcd_server, pool, tmp_path) -> None:
    proc, _ = start_gateway(etcd_server.endpoint, pool, tmp_path, "--no-auth", "--workers", "2", "--id", "edge-1")
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=pool)).connect()
    try:
        async def fleet() -> set[str] | None:
            kvs, _ = await store.list_prefix(Keys(pool).gateways)
            ids = {kv.key.rsplit("/", 1)[-1] for kv in kvs}
            return ids if ids == {"edge-1-w0", "edge-1-w1"} else None
        await eventually(fleet, timeout=15, what="both workers registered under the fixed id")
    finally:
        await store.close()
        stop_all([proc])
