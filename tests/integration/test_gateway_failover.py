"""Gateway failover under load: an engine or a whole agent dies, no request started later fails.

Real etcd, one `ctl gateway`, three `ctl agent --serve` processes (sim engine, lease TTL 3 s)
for one model, and ~20 concurrent clients sending streaming and non-streaming chat requests
through the gateway. Mid-load we SIGKILL

* one engine process (the agent's sim child): the agent sees it exit and marks it FAILED, or
* one agent together with its engine (both process groups): nothing marks the record, so the
  instance leaves the routing table only when its lease expires.

Requests that started after the kill must all succeed (retries before the first byte, passive
ejection). Streams already under way on the killed engine may be cut: those are counted apart and
must all have started before the kill, and be no more than the streams in flight at that moment.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import decode
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.procs import signal_group
from controlplane.store import EtcdStore
from tests.cluster import eventually, instances_prefix, start_agent, start_gateway, stop_all, tenant_keys

MODEL = "failover-model"
TTL_S = 3
CLIENTS = 20
AGENTS = ("fo-a", "fo-b", "fo-c")
VICTIM = "fo-b"


@dataclass
class Outcome:
    """One request as the client saw it (monotonic times)."""

    stream: bool
    started: float
    ended: float
    ok: bool
    detail: str = ""


@dataclass
class Load:
    """A steady mixed load until ``stop`` is set."""

    gateway: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[int, tuple[bool, float]] = field(default_factory=dict)  # id → (stream, started)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, clients: int = CLIENTS) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.gather(*(self._client(http, n % 2 == 0) for n in range(clients)))

    async def _client(self, http: aiohttp.ClientSession, stream: bool) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 12,
                "stream": stream}
        while not self.stop.is_set():
            started = time.monotonic()
            token = next(self._ids)
            self.in_flight[token] = (stream, started)
            ok, detail = False, ""
            try:
                async with http.post(f"{self.gateway}/v1/chat/completions", json=body) as r:
                    data = await r.read()
                ok = r.status == 200 and (data.endswith(b"data: [DONE]\n\n") if stream else
                                          json.loads(data)["choices"][0]["finish_reason"] == "length")
                detail = "" if ok else f"HTTP {r.status}: {data[-160:]!r}"
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
            finally:
                del self.in_flight[token]
            self.outcomes.append(Outcome(stream, started, time.monotonic(), ok, detail))


@dataclass
class Pool:
    """The processes of one failover scenario."""

    gateway: str
    store: EtcdStore
    agents: dict[str, tuple[subprocess.Popen[bytes], Path]]
    procs: list[subprocess.Popen[bytes]]


async def routable(http: aiohttp.ClientSession, gateway: str) -> int:
    """READY instances of MODEL the gateway routes to now."""
    async with http.get(f"{gateway}/v1/models/{MODEL}") as r:
        return int((await r.json())["instances"]) if r.status == 200 else 0


def engine_pid(agent_log: Path) -> int:
    """The pid of the agent's engine child, from its 'engine started' log line."""
    pids = [json.loads(line)["pid"] for line in agent_log.read_text().splitlines()
            if line.startswith("{") and '"engine started"' in line]
    if not pids:
        raise LookupError(f"no engine started in {agent_log}")
    return int(pids[-1])


@pytest.fixture
async def pool(etcd_server: EtcdProcess, store: EtcdStore, tmp_path: Path):  # type: ignore[no-untyped-def]
    gw, url = start_gateway(etcd_server.endpoint, store.prefix, tmp_path, "--no-auth")
    agents = {n: start_agent(etcd_server.endpoint, store.prefix, tmp_path, MODEL, n, "--lease-ttl", str(TTL_S),
                             "--drain-grace", "5", "--sim-option", "ttft_ms=20", "--sim-option", "tokens_per_s=60")
              for n in AGENTS}
    procs = [gw, *(p for p, _ in agents.values())]
    try:
        async with aiohttp.ClientSession() as http:
            async def all_up() -> bool:
                return await routable(http, url) == len(AGENTS)
            await eventually(all_up, timeout=30, what="three routable instances")
        yield Pool(url, store, agents, procs)
    finally:
        stop_all(procs)


async def run_kill_scenario(pool: Pool, kill: str) -> dict[str, float]:
    """Load, kill (``engine`` or ``agent``) the victim mid-load, keep loading; assert and return numbers."""
    victim_proc, victim_log = pool.agents[VICTIM]
    kvs, _ = await pool.store.list_prefix(instances_prefix(pool.store.prefix))
    victim_id = next(r.instance_id for r in (decode(InstanceRecord, kv) for kv in kvs) if r.node_id == VICTIM)
    pid = engine_pid(victim_log)
    load = Load(pool.gateway)
    loader = asyncio.create_task(load.run())
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(1.5)
        warm = len(load.outcomes)
        streams_in_flight = sum(1 for stream, _ in list(load.in_flight.values()) if stream)
        killed_at = time.monotonic()
        if kill == "engine":
            os.killpg(pid, signal.SIGKILL)
        else:  # the node dies: agent and engine at once, nobody left to update etcd
            signal_group(victim_proc, signal.SIGKILL)
            os.killpg(pid, signal.SIGKILL)

        async def victim_gone() -> bool:
            return await routable(http, pool.gateway) == len(AGENTS) - 1
        await eventually(victim_gone, timeout=TTL_S + 5, interval=0.02, what="victim out of the routing table")
        left_s = time.monotonic() - killed_at
        await asyncio.sleep(1.5)  # keep loading on the smaller pool (and through ejection expiry)
        load.stop.set()
        await asyncio.wait_for(loader, 30)

    late = [o for o in load.outcomes if o.started >= killed_at]
    cut = [o for o in load.outcomes if not o.ok]
    summary = {"requests": len(load.outcomes), "after_kill": len(late), "cut": len(cut),
               "streams_in_flight_at_kill": streams_in_flight, "left_table_s": round(left_s, 3)}
    print(f"\nfailover ({kill}): {summary}")
    assert warm > 50, f"only {warm} requests before the kill: the load never got going"
    assert len(late) > 50, f"only {len(late)} requests after the kill: the test proves little"
    assert all(o.ok for o in late), [o.detail for o in late if not o.ok][:5]
    assert all(o.started < killed_at and o.stream for o in cut), [(o.stream, o.detail) for o in cut][:5]
    assert len(cut) <= streams_in_flight, summary
    assert left_s < TTL_S + 2, summary
    if kill == "engine":
        rec = await _victim_record(pool.store, victim_id)
        assert rec is not None and (rec.restarts >= 1 or rec.state == InstanceState.FAILED), rec
        assert victim_proc.poll() is None, "the agent survives its engine"
    else:
        assert await _victim_record(pool.store, victim_id) is None, "the lease expired with the agent"
        assert await pool.store.get(tenant_keys(pool.store.prefix).node(VICTIM)) is None
    return summary


async def _victim_record(store: EtcdStore, instance_id: str) -> InstanceRecord | None:
    kvs, _ = await store.list_prefix(instances_prefix(store.prefix))
    return next((r for r in (decode(InstanceRecord, kv) for kv in kvs) if r.instance_id == instance_id), None)


async def test_engine_sigkill_under_load(pool: Pool) -> None:
    await run_kill_scenario(pool, "engine")


async def test_agent_and_engine_sigkill_under_load_waits_for_lease(pool: Pool) -> None:
    summary = await run_kill_scenario(pool, "agent")
    assert summary["left_table_s"] > 0.5, "gone before any lease could expire: not the lease path"
