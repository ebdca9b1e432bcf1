"""Attack 2 (slowloris): 20,000 connections trickling request heads from 10 loopback addresses.

Before: no connection cap and no deadline for a request head (the idle timer restarted on every
byte), so the slow connections exhausted the gateway's file descriptors, keyed clients were reset
and none of the slow connections was ever closed. Now the gateway caps its connections below
RLIMIT_NOFILE, sheds the oldest connection without a complete head when a new one arrives at the
cap, and closes heads that are not complete ``--head-timeout`` seconds after accept.

Done when: a keyed request is served within 3 s while the slow connections exist, and >= 95 % of
them are closed within the head deadline + 15 s. The load is spread over several attacker
processes (the fd limit is per process); bounded: 20,000 connections, ~60 s in all.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import sys
import time
from pathlib import Path

import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.procs import spawn, stop
from tests.cluster import Sim
from tests.security.edge import (
    can_bind,
    chat_body,
    new_world,
    parse_responses,
    raw,
    request_bytes,
    source_addresses,
    stop_world,
)

CONNECTIONS = 20_000
SOURCES = 10
HEAD_TIMEOUT_S = 5.0
GRACE_S = 15.0
SERVED_WITHIN_S = 3.0

pytestmark = [pytest.mark.slow_security, pytest.mark.timeout(150)]


async def keyed_request(port: int, key: str) -> tuple[float, int]:
    """Seconds until a keyed chat completion is answered on a fresh connection, and its status."""
    began = time.monotonic()
    data = await raw(port, request_bytes("POST", "/v1/chat/completions", key=key, body=chat_body("pub")),
                     read_for=10, until_closed=False)
    replies = parse_responses(data)
    return time.monotonic() - began, replies[0].status if replies else 0


def test_keyed_client_is_served_while_20000_slow_connections_trickle(etcd_server: EtcdProcess,
                                                                     tmp_path: Path) -> None:
    sources = source_addresses(SOURCES)
    if not all(can_bind(a) for a in sources):
        pytest.skip("127.0.0.x source addresses cannot be bound here")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_process = max(500, min(2500, hard - 200))
    processes = math.ceil(CONNECTIONS / per_process)
    world = new_world(etcd_server.endpoint, tmp_path, {"pub": [Sim("pub", tmp_path, "--ttft-ms", "1",
                                                                   "--tokens-per-s", "0")]},
                      ("--head-timeout", str(HEAD_TIMEOUT_S)))
    attackers = []
    try:
        for i in range(processes):
            count = min(per_process, CONNECTIONS - i * per_process)
            attackers.append(spawn([sys.executable, "-m", "tests.security.slowloris_client", "--port", str(world.port),
                                    "--sources", ",".join(sources), "--count", str(count), "--interval", "3",
                                    "--linger", str(HEAD_TIMEOUT_S + GRACE_S + 10),
                                    "--ready", str(tmp_path / f"ready-{i}"), "--out", str(tmp_path / f"out-{i}")],
                                   tmp_path / f"attacker-{i}.log"))
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(processes)):
            assert time.monotonic() < deadline, "the attackers did not open their connections in 60 s"
            # an attacker whose connections were all shed may be done already; one that died early is not
            crashed = [i for i, p in enumerate(attackers) if p.poll() not in (None, 0)]
            assert not crashed, (tmp_path / f"attacker-{crashed[0]}.log").read_text()[-2000:] if crashed else ""
            time.sleep(0.1)
        opened = sum(json.loads((tmp_path / f"ready-{i}").read_text())["opened"] for i in range(processes))
        # the slow connections exist (the newest ones still open in the gateway): a keyed client is served
        served = [asyncio.run(keyed_request(world.port, world.keys["ann"])) for _ in range(3)]
        for i, p in enumerate(attackers):
            p.wait(timeout=HEAD_TIMEOUT_S + GRACE_S + 40)
            assert p.returncode == 0, (tmp_path / f"attacker-{i}.log").read_text()[-2000:]
        spans = [c - o if c is not None else math.inf
                 for i in range(processes) for o, c in json.loads((tmp_path / f"out-{i}").read_text())]
    finally:
        for p in attackers:
            stop(p, timeout=5)
        stop_world(world)
    within = sum(1 for s in spans if s <= HEAD_TIMEOUT_S + GRACE_S) / max(1, len(spans))
    closed_spans = sorted(s for s in spans if s != math.inf)
    p95 = closed_spans[int(0.95 * (len(closed_spans) - 1))] if closed_spans else math.inf
    print(f"\nslowloris: {opened} of {CONNECTIONS} slow connections opened from {SOURCES} addresses "
          f"over {processes} processes; keyed requests answered in {[round(t, 3) for t, _ in served]} s "
          f"with {[s for _, s in served]}; {within:.1%} of the slow connections closed within "
          f"{HEAD_TIMEOUT_S + GRACE_S:g} s (head deadline {HEAD_TIMEOUT_S:g} s + {GRACE_S:g} s); "
          f"95th percentile of time to close {p95:.1f} s")
    assert opened >= 0.95 * CONNECTIONS, f"only {opened} slow connections opened"
    assert all(status == 200 and took <= SERVED_WITHIN_S for took, status in served), served
    assert within >= 0.95, f"{within:.1%} closed within the head deadline + {GRACE_S:g} s"
