"""The fault suite's world: real processes (etcd, `ctl agent` with sim engines, `ctl gateway`) and a
steady streamed load that records every request (used by bench/faults.py and tests/faults/).

    Pool.start(): etcd (1 member, or a 3-member cluster), N agents (`--serve`, sim engine,
                  lease TTL), G gateways; waits until every instance is routable
    Load.run():   an open loop of streamed chat requests at `rate` per second, bounded in count
                  (rate x seconds) and in concurrency; each Outcome keeps start, first byte, end, ok
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.etcdproc import EtcdCluster, EtcdProcess  # noqa: E402
from controlplane.keys import Keys  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.pb import InstanceRecord, InstanceState  # noqa: E402
from controlplane.procs import signal_group, spawn, stop  # noqa: E402

CTL = [sys.executable, "-m", "controlplane.cli.main"]
MODEL = "fault-model"
PREFIX = "/mp-faults"


@dataclass
class Outcome:
    """One request as the client saw it (monotonic seconds)."""

    started: float
    first_byte: float | None
    ended: float
    ok: bool
    status: int
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """Streamed chat requests at ``rate``/s to the gateways (round-robin; a refused connection goes to
    the next gateway, as a load balancer would), at most ``max_requests`` and ``max_in_flight``."""

    gateways: list[str]
    rate: float
    max_requests: int
    max_in_flight: int = 2000
    request_timeout_s: float = 90.0
    max_tokens: int = 16
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self) -> None:
        """Send until ``stop`` is set or ``max_requests`` were sent; then wait for the ones in flight."""
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            sent = 0
            while not self.stop.is_set() and sent < self.max_requests:
                if len(tasks) < self.max_in_flight:
                    task = asyncio.create_task(self._one(http))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                next_at += interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.0, next_at - time.monotonic()))
            if tasks:
                await asyncio.wait(tasks, timeout=self.request_timeout_s + 5)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": self.max_tokens, "stream": True}
        started = time.monotonic()
        first: float | None = None
        status, ok, detail = 0, False, ""
        first_choice = next(self._rr)
        for attempt in range(len(self.gateways)):
            url = self.gateways[(first_choice + attempt) % len(self.gateways)]
            try:
                async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                    status = r.status
                    data = bytearray()
                    async for chunk in r.content.iter_any():
                        if first is None:
                            first = time.monotonic()
                        data += chunk
                ok = status == 200 and data.endswith(b"data: [DONE]\n\n")
                detail = "" if ok else f"HTTP {status}: {bytes(data[-200:])!r}"
                break
            except aiohttp.ClientConnectorError as exc:   # nothing was sent: the next gateway
                detail = f"connect: {exc}"
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
                break
        self.outcomes.append(Outcome(started, first, time.monotonic(), ok, status, detail))


@dataclass
class Agent:
    """One `ctl agent` process and its log."""

    node_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def engine_pid(self) -> int:
        """The pid of the agent's current engine (its last 'engine started' log line)."""
        pids = [json.loads(line)["pid"] for line in self.log.read_text().splitlines()
                if line.startswith("{") and '"engine started"' in line]
        if not pids:
            raise LookupError(f"no engine started in {self.log}")
        return int(pids[-1])


@dataclass
class Pool:
    """The processes of one scenario; ``close`` stops all of them."""

    workdir: Path
    agents: int = 3
    gateways: int = 1
    workers: int = 1
    lease_ttl: int = 10
    etcd_members: int = 1
    sim_options: tuple[str, ...] = ("ttft_ms=20", "tokens_per_s=100")
    gateway_args: tuple[str, ...] = ()
    etcd: EtcdProcess | None = None
    cluster: EtcdCluster | None = None
    agent_procs: list[Agent] = field(default_factory=list)
    gateway_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateway_urls: list[str] = field(default_factory=list)

    @property
    def endpoints(self) -> str:
        if self.cluster is not None:
            return ",".join(self.cluster.endpoints)
        assert self.etcd is not None
        return self.etcd.endpoint

    async def start(self, timeout: float = 90.0) -> None:
        """Start everything and wait until every agent's instance is routable through every gateway."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.etcd_members > 1:
            self.cluster = EtcdCluster.in_temp_dir(self.etcd_members).start()
        else:
            self.etcd = EtcdProcess.in_temp_dir().start()
        for i in range(self.gateways):
            port = free_port()
            log = self.workdir / f"gateway-{i}.log"
            self.gateway_procs.append(spawn(
                [*CTL, "gateway", "--etcd", self.endpoints, "--etcd-prefix", PREFIX, "--host", "127.0.0.1",
                 "--port", str(port), "--no-auth", "--workers", str(self.workers),
                 "--lease-ttl", str(self.lease_ttl), *self.gateway_args], log))
            self.gateway_urls.append(f"http://127.0.0.1:{port}")
        for i in range(self.agents):
            node = f"fault-node-{i}"
            log = self.workdir / f"agent-{node}.log"
            sims = [a for opt in self.sim_options for a in ("--sim-option", opt)]
            proc = spawn([*CTL, "agent", "--etcd", self.endpoints, "--etcd-prefix", PREFIX, "--serve", MODEL,
                          "--engine", "sim", "--gpus", "1xSIM-24GB", "--node-id", node, "--lease-ttl",
                          str(self.lease_ttl), "--drain-grace", "5", "--log-dir", str(self.workdir / "engines"),
                          *sims], log)
            self.agent_procs.append(Agent(node, proc, log))
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                counts = [await routable(http, url) for url in self.gateway_urls]
                if all(c == self.agents for c in counts):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pool not routable after {timeout}s: {counts}; logs in {self.workdir}")
                await asyncio.sleep(0.2)

    async def instances(self) -> list[InstanceRecord]:
        """Instance records in etcd now, read through etcd's JSON gateway: this process never opens a
        gRPC channel, because forking (etcd restarts) with gRPC's threads running can hang the child."""
        prefix = Keys(PREFIX).instances.encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        body = json.dumps({"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()})
        for endpoint in self.endpoints.split(","):
            try:
                data = await asyncio.to_thread(_post_json, f"http://{endpoint}/v3/kv/range", body.encode())
            except OSError:
                continue
            out = []
            for kv in data.get("kvs", []):
                rec = InstanceRecord()
                rec.ParseFromString(base64.b64decode(kv.get("value", "")))
                out.append(rec)
            return out
        raise OSError("no etcd member answered")

    async def engine_urls(self) -> list[str]:
        """Endpoints of every READY instance."""
        return [r.endpoint for r in await self.instances() if r.state == InstanceState.READY]

    def gateway_workers(self, index: int = 0) -> list[int]:
        """Pids of the worker processes of gateway ``index`` (its children)."""
        parent = self.gateway_procs[index].pid
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry.name))
        return sorted(out)

    def etcd_leader(self) -> EtcdProcess:
        """The member of the 3-member cluster that leads now."""
        assert self.cluster is not None
        for m in self.cluster.members:
            if m.proc is None:
                continue
            try:
                req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
                with urllib.request.urlopen(req, timeout=2) as resp:
                    status = json.load(resp)
            except OSError:
                continue
            if status.get("leader") == status.get("header", {}).get("member_id"):
                return m
        raise LookupError("no etcd member says it leads")

    async def close(self) -> None:
        """Stop every process (gateways and agents first, then etcd)."""
        for p in self.gateway_procs:
            stop(p, timeout=10)
        for a in self.agent_procs:
            stop(a.proc, timeout=10)
        for pid in self._engine_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self.cluster is not None:
            for m in self.cluster.members:
                if m.proc is not None:
                    m.proc.send_signal(signal.SIGCONT)
            self.cluster.stop()
        if self.etcd is not None:
            if self.etcd.proc is not None:
                self.etcd.proc.send_signal(signal.SIGCONT)
            self.etcd.stop()

    def _engine_pids(self) -> list[int]:
        out = []
        for a in self.agent_procs:
            with contextlib.suppress(LookupError, OSError, ValueError):
                out.append(a.engine_pid())
        return out


def _post_json(url: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=3) as resp:
        return dict(json.load(resp))


async def routable(http: aiohttp.ClientSession, gateway: str) -> int:
    """READY instances of MODEL the gateway routes to now (0 when it does not answer)."""
    try:
        async with http.get(f"{gateway}/v1/models/{MODEL}", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return int((await r.json())["instances"]) if r.status == 200 else 0
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        return 0


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal ``proc``'s process group."""
    signal_group(proc, sig)


def new_workdir() -> Path:
    """A fresh directory for one run's logs."""
    return Path(tempfile.mkdtemp(prefix="modelpool-faults-"))
