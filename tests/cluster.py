"""Helpers that start real modelpool processes for tests and benchmarks: engines, agents, gateways."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from controlplane.keys import Keys, TenantKeys
from controlplane.netutil import free_port
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.procs import spawn, stop
from controlplane.tenancy import DEFAULT_TENANT
from gateway.app import Gateway, GatewayConfig

T = TypeVar("T")
CTL = [sys.executable, "-m", "controlplane.cli.main"]


def tenant_keys(prefix: str, tenant: str = DEFAULT_TENANT) -> TenantKeys:
    """Where `ctl agent` (tenant ``tenant``, by default the one agents use without etcd auth) writes."""
    return Keys(prefix).for_tenant(tenant)


def instances_prefix(prefix: str, tenant: str = DEFAULT_TENANT) -> str:
    """The prefix of a tenant's instance records (``<prefix>/tenants/<tenant>/instances/``)."""
    return Keys(prefix).tenant(tenant) + "instances/"


def nodes_prefix(prefix: str, tenant: str = DEFAULT_TENANT) -> str:
    """The prefix of a tenant's node records."""
    return Keys(prefix).tenant(tenant) + "nodes/"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0,
              log: Path | None = None) -> None:
    """Wait until ``url`` answers 200; fail early (with the log tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url, timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{url} not ready (exit={proc.poll() if proc else None})\n{tail}")


class Sim:
    """A sim engine subprocess."""

    def __init__(self, model: str, tmp: Path, *args: str) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"sim-{model}-{self.port}.log"
        self.proc = spawn([sys.executable, "-m", "agent.sim", "--model", model, "--port", str(self.port), *args],
                          self.log)
        wait_http(self.url + "/health", self.proc, log=self.log)

    def stop(self) -> None:
        stop(self.proc, timeout=5)


def start_gateway(endpoint: str, prefix: str, tmp: Path, *args: str,
                  port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A `ctl gateway` subprocess on loopback (no auth unless ``args`` say otherwise); returns (proc, base url)."""
    port = port or free_port()
    log = tmp / f"gateway-{port}.log"
    argv = [*CTL, "gateway", "--etcd", endpoint, "--etcd-prefix", prefix, "--host", "127.0.0.1",
            "--port", str(port), *args]
    proc = spawn(argv, log)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, log=log)
    return proc, f"http://127.0.0.1:{port}"


def start_agent(endpoint: str, prefix: str, tmp: Path, model: str, node_id: str,
                *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """A `ctl agent --engine sim` subprocess; returns (proc, its log path)."""
    log = tmp / f"agent-{node_id}.log"
    argv = [*CTL, "agent", "--etcd", endpoint, "--etcd-prefix", prefix, "--serve", model, "--engine", "sim",
            "--gpus", "1xSIM-24GB", "--node-id", node_id, "--log-dir", str(tmp / "engine-logs"), *args]
    return spawn(argv, log, env={**os.environ, **(env or {})}), log


def instance_record(model: str, instance_id: str, url: str, state: int = InstanceState.READY,
                    **extra: object) -> InstanceRecord:
    """An InstanceRecord as an agent would write it."""
    return InstanceRecord(instance_id=instance_id, model=model, node_id=f"node-{instance_id}", endpoint=url,
                          state=state, engine="sim", **extra)  # type: ignore[arg-type]


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")


async def exit_code(proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> int:
    """Wait for ``proc`` to exit; on timeout fail with the tail of its ``log`` (what it was doing)."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log and log.exists() else ""
        raise AssertionError(f"pid {proc.pid} still running {timeout}s later; log tail:\n{tail}") from None


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop processes (TERM, then KILL)."""
    for p in procs:
        stop(p, timeout=10)


@contextlib.asynccontextmanager
async def gateway_in_process(config: GatewayConfig) -> AsyncIterator[tuple[Gateway, str]]:
    """A Gateway serving a free loopback port in this process (its URL), drained when the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    gw = Gateway(config)
    await gw.start(sock)
    try:
        yield gw, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await gw.stop(5)
