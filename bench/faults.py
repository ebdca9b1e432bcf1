"""Fault injection under steady streamed load: real etcd, `ctl agent`s with sim engines, `ctl gateway`.

Each scenario gets a fresh pool (3 agents serving one model, lease TTL 10 s, one gateway unless the
scenario needs more), a steady open-loop load of streamed chat requests (25/s by default, bounded
by count and time), one fault in the middle, and a table row:

    scenario   sent   failed   in flight cut   slow (>3 s)   recovery s   notes

``failed`` counts every request that did not end in a complete stream; ``in flight cut`` are the
failed ones that were already running when the fault began (streams on a process that died);
``recovery s`` is the time from the fault to the start of the last failed or slow request (0 when
none). ``notes`` carry scenario facts, e.g. how fast /readyz noticed a hung etcd.

    python bench/faults.py                                   # every scenario (~12 min)
    python bench/faults.py --scenarios hung-etcd,engine-500s --out /tmp/faults.json
    python bench/faults.py --list

Results and the command behind them: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fault_env import MODEL, Load, Outcome, Pool, kill_group, new_workdir, routable

SLOW_S = 3.0


@dataclass
class Ctx:
    """What a fault needs: the pool, how long the fault lasts, and a place for notes."""

    pool: Pool
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)


FaultFn = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One fault: how the pool is built, what is done to it, for how long (before --scale)."""

    name: str
    what: str
    fault: FaultFn
    seconds: float
    pool: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    sent: int
    failed: int
    in_flight_cut: int
    slow: int
    recovery_s: float
    notes: dict[str, Any]
    failures: list[str]


# -- helpers ---------------------------------------------------------------------------------------


async def watch_until(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``check`` is true (polled), or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():
            return round(time.monotonic() - t0, 2)
        await asyncio.sleep(interval)
    return None


async def readyz(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    try:
        async with http.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return dict(await r.json())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def post_faults(url: str, faults: dict[str, float]) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/sim/faults", json=faults) as r:
        r.raise_for_status()


def signal_pid_group(pid: int, sig: int) -> None:
    os.killpg(pid, sig)


# -- the faults -------------------------------------------------------------------------------------


async def hung_etcd(ctx: Ctx) -> None:
    etcd = ctx.pool.etcd
    assert etcd is not None and etcd.proc is not None
    gw = ctx.pool.gateway_urls[0]
    async with aiohttp.ClientSession() as http:
        etcd.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()

        async def unreachable() -> bool:
            body = await readyz(http, gw)
            return body.get("etcd") == "unreachable" and body.get("status") == "degraded"
        ctx.notes["readyz_degraded_after_s"] = await watch_until(unreachable, ctx.seconds)
        await asyncio.sleep(max(0.0, ctx.seconds - (time.monotonic() - t0)))
        etcd.proc.send_signal(signal.SIGCONT)

        async def ok() -> bool:
            return (await readyz(http, gw)).get("status") == "ok"
        ctx.notes["readyz_ok_after_resume_s"] = await watch_until(ok, 60)


async def hung_engine(ctx: Ctx) -> None:
    victim = ctx.pool.agent_procs[1]
    pid = victim.engine_pid()
    gw = ctx.pool.gateway_urls[0]
    signal_pid_group(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            async def out() -> bool:
                return await routable(http, gw) == ctx.pool.agents - 1
            ctx.notes["left_routing_after_s"] = await watch_until(out, ctx.seconds)
        await asyncio.sleep(max(0.0, ctx.seconds - (time.monotonic() - t0)))
    finally:
        signal_pid_group(pid, signal.SIGCONT)


async def engine_500s(ctx: Ctx) -> None:
    urls = await ctx.pool.engine_urls()
    for url in urls:
        await post_faults(url, {"error_rate": 0.3})
    try:
        await asyncio.sleep(ctx.seconds)
    finally:
        for url in urls:
            await post_faults(url, {"error_rate": 0.0})


async def engine_sigkill(ctx: Ctx) -> None:
    signal_pid_group(ctx.pool.agent_procs[1].engine_pid(), signal.SIGKILL)
    gw = ctx.pool.gateway_urls[0]
    async with aiohttp.ClientSession() as http:
        async def out() -> bool:
            return await routable(http, gw) < ctx.pool.agents
        ctx.notes["left_routing_after_s"] = await watch_until(out, 10)
    await _note_recovery(ctx)


async def agent_sigkill(ctx: Ctx) -> None:
    kill_group(ctx.pool.agent_procs[1].proc, signal.SIGKILL)   # its engine dies with it (parent-death signal)
    gw = ctx.pool.gateway_urls[0]
    async with aiohttp.ClientSession() as http:
        async def out() -> bool:
            return await routable(http, gw) == ctx.pool.agents - 1
        ctx.notes["left_routing_after_s"] = await watch_until(out, ctx.seconds + 20)


async def agent_sigstop(ctx: Ctx) -> None:
    victim = ctx.pool.agent_procs[1]
    kill_group(victim.proc, signal.SIGSTOP)          # the agent only: its engine keeps serving
    try:
        await asyncio.sleep(ctx.seconds)
    finally:
        kill_group(victim.proc, signal.SIGCONT)
    await _note_recovery(ctx)


async def etcd_leader_kill(ctx: Ctx) -> None:
    leader = ctx.pool.etcd_leader()
    ctx.notes["killed"] = leader.name
    leader.kill(signal.SIGKILL)
    await asyncio.sleep(ctx.seconds)
    leader.start(wait=False)


async def etcd_kill(ctx: Ctx) -> None:
    etcd = ctx.pool.etcd
    assert etcd is not None
    etcd.kill(signal.SIGKILL)
    await asyncio.sleep(ctx.seconds)
    etcd.start()
    await _note_recovery(ctx)


async def gateway_worker_kill(ctx: Ctx) -> None:
    workers = ctx.pool.gateway_workers(0)
    ctx.notes["workers"] = len(workers)
    os.kill(workers[0], signal.SIGKILL)
    await asyncio.sleep(ctx.seconds)
    ctx.notes["workers_after"] = len(ctx.pool.gateway_workers(0))


async def gateway_sigterm(ctx: Ctx) -> None:
    proc = ctx.pool.gateway_procs[0]
    t0 = time.monotonic()
    kill_group(proc, signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 60)
    ctx.notes["drained_exit"] = code
    ctx.notes["exited_after_s"] = round(time.monotonic() - t0, 2)
    await asyncio.sleep(max(0.0, ctx.seconds - (time.monotonic() - t0)))


async def _note_recovery(ctx: Ctx) -> None:
    gw = ctx.pool.gateway_urls[0]
    async with aiohttp.ClientSession() as http:
        async def all_back() -> bool:
            return await routable(http, gw) == ctx.pool.agents
        ctx.notes["all_routable_after_s"] = await watch_until(all_back, 60)


SCENARIOS = {s.name: s for s in (
    Scenario("hung-etcd", "etcd SIGSTOP 30 s, then SIGCONT", hung_etcd, 30),
    Scenario("hung-engine", "one engine SIGSTOP 20 s", hung_engine, 20),
    Scenario("engine-500s", "every engine answers 500 to 30% of requests for 30 s", engine_500s, 30),
    Scenario("engine-sigkill", "one engine SIGKILL (its agent restarts it)", engine_sigkill, 0),
    Scenario("agent-sigkill", "one agent SIGKILL (its engine dies with it)", agent_sigkill, 0),
    Scenario("agent-sigstop", "one agent SIGSTOP 20 s (> lease TTL), engine keeps serving", agent_sigstop, 20),
    Scenario("etcd-leader-kill", "3-member etcd: leader SIGKILL, back after 10 s", etcd_leader_kill, 10,
             {"etcd_members": 3}),
    Scenario("etcd-kill", "single etcd SIGKILL, restarted after 30 s", etcd_kill, 30),
    Scenario("gateway-worker-kill", "gateway with 2 workers: one SIGKILL (restarted by its parent)",
             gateway_worker_kill, 5, {"workers": 2}),
    Scenario("gateway-sigterm", "2 gateways: one SIGTERM (drains); the client's balancer uses the other",
             gateway_sigterm, 5, {"gateways": 2}),
)}


# -- running ----------------------------------------------------------------------------------------


def summarize(name: str, outcomes: list[Outcome], t0: float, notes: dict[str, Any]) -> Row:
    """The table row of one scenario (see the module docstring for the columns)."""
    failed = [o for o in outcomes if not o.ok]
    cut = [o for o in failed if o.started < t0 and o.first_byte is not None]
    slow = [o for o in outcomes if o.ok and o.latency > SLOW_S]
    bad = [o for o in (*failed, *slow) if o.ended >= t0]
    recovery = max((o.started - t0 for o in bad), default=0.0)
    details: dict[str, int] = {}
    for o in failed:
        details[o.detail[:90]] = details.get(o.detail[:90], 0) + 1
    return Row(name, len(outcomes), len(failed), len(cut), len(slow), round(max(0.0, recovery), 2), notes,
               [f"{n} x {d}" for d, n in sorted(details.items(), key=lambda kv: -kv[1])[:5]])


async def run_scenario(sc: Scenario, *, rate: float, ttl: int, warm_s: float, post_s: float, scale: float,
                       workdir: Path, gateway_args: tuple[str, ...] = ()) -> Row:
    """Build the pool, load it, inject the fault, keep loading, and summarize."""
    pool = Pool(workdir / sc.name, lease_ttl=ttl, gateway_args=gateway_args, **sc.pool)
    try:
        await pool.start()
        seconds = sc.seconds * scale
        total_s = warm_s + seconds + post_s + 60
        load = Load(pool.gateway_urls, rate=rate, max_requests=int(rate * total_s))
        loader = asyncio.create_task(load.run())
        await asyncio.sleep(warm_s)
        ctx = Ctx(pool, seconds)
        t0 = time.monotonic()
        await sc.fault(ctx)
        await asyncio.sleep(post_s)
        load.stop.set()
        await asyncio.wait_for(loader, load.request_timeout_s + 30)
        return summarize(sc.name, load.outcomes, t0, ctx.notes)
    finally:
        await pool.close()


def render(rows: list[Row]) -> str:
    """The aligned table."""
    head = ("scenario", "sent", "failed", "in flight cut", "slow >3s", "recovery s", "notes")
    lines = [head] + [(r.scenario, str(r.sent), str(r.failed), str(r.in_flight_cut), str(r.slow),
                       f"{r.recovery_s:g}", ", ".join(f"{k}={v}" for k, v in r.notes.items())) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--rate", type=float, default=25.0, help="streamed requests per second")
    ap.add_argument("--ttl", type=int, default=10, help="lease TTL of agents and gateways (s)")
    ap.add_argument("--warm", type=float, default=5.0, help="seconds of load before the fault")
    ap.add_argument("--post", type=float, default=15.0, help="seconds of load after the fault ended")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every fault's duration (quick runs)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            print(f"{sc.name:22s} {sc.what}")
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    workdir = new_workdir()
    rows: list[Row] = []

    async def run_all() -> None:
        for name in names:
            print(f"== {name}: {SCENARIOS[name].what}", file=sys.stderr, flush=True)
            row = await run_scenario(SCENARIOS[name], rate=args.rate, ttl=args.ttl, warm_s=args.warm,
                                     post_s=args.post, scale=args.scale, workdir=workdir)
            rows.append(row)
            print(render([row]).splitlines()[-1], file=sys.stderr, flush=True)
            for f in row.failures:
                print(f"   {f}", file=sys.stderr, flush=True)

    asyncio.run(run_all())
    print(f"\nrate {args.rate:g}/s streamed, {MODEL} on 3 sim agents, lease TTL {args.ttl} s; logs in {workdir}\n")
    print(render(rows))
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
