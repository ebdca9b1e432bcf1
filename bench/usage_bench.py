"""etcd writes of one gateway's accounting, and etcd's database size after a soak.

Starts a real etcd (auto-compaction on, as `ctl dev` runs it), sim engines and one `ctl gateway`
with the default cadence and auth, then drives real HTTP traffic that touches every one of P
active (key, model) pairs at least once per usage flush interval. etcd's own counters
(``etcd_mvcc_put_total`` on its /metrics) give the puts per minute.

Baseline, measured in the same run against the same etcd: the write pattern of the previous
accounting (one ``usage/<key>/<model>/<gateway>`` put per active pair and one
``demand/<model>/<gateway>`` put per model every 5 s, in transactions of at most 100
operations), replayed by this script with records of the same size for the same time.

Soak: the same traffic at the largest P for ``--soak-minutes`` (10 by default) with compaction on
(``--compaction-retention``, 5m by default), etcd's database size every minute; then the baseline
pattern for as long on a fresh etcd.

    python bench/usage_bench.py                          # 50 and 500 pairs, 60 s each, 10-minute soaks
    python bench/usage_bench.py --seconds 20 --soak-minutes 1     # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import ApiKey, Demand, Usage
from controlplane.procs import stop
from controlplane.store import EtcdConfig, EtcdStore, Op
from gateway.auth import key_hash, new_api_key
from tests.cluster import Sim, instance_record, start_gateway

MODELS = ("bench-a", "bench-b", "bench-c", "bench-d", "bench-e")
FLUSH_S = 5.0


def etcd_metric(etcd: EtcdProcess, name: str) -> float:
    """One counter or gauge from etcd's /metrics (summed over label sets)."""
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@dataclass
class Phase:
    """One measured phase."""

    name: str
    pairs: int
    seconds: float
    puts: float
    txns: float
    requests: int = 0
    db_size_mb: list[float] = field(default_factory=list)
    db_in_use_mb: list[float] = field(default_factory=list)

    @property
    def puts_per_minute(self) -> float:
        return self.puts * 60 / self.seconds


async def make_keys(store: EtcdStore, keys: Keys, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        secret = new_api_key()
        kid = key_hash(secret)[:8]
        await store.put(keys.api_key(key_hash(secret)), ApiKey(key_id=kid, owner=f"owner-{i}").SerializeToString())
        out.append((secret, kid))
    return out


async def drive(url: str, pairs: list[tuple[str, str]], seconds: float) -> int:
    """Touch every pair once per FLUSH_S / 2 (so every flush sees every pair changed), for ``seconds``."""
    body_of = {m: {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} for m in MODELS}
    period = FLUSH_S / 2
    done = 0
    queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=64)

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal done
        while (item := await queue.get()) is not None:
            secret, model = item
            async with http.post(f"{url}/v1/chat/completions", json=body_of[model],
                                 headers={"Authorization": f"Bearer {secret}"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"gateway answered {r.status}")
            done += 1

    async with aiohttp.ClientSession() as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(16)]
        end = time.monotonic() + seconds
        rounds = itertools.count()
        while time.monotonic() < end:
            start = time.monotonic()
            for pair in pairs:
                await queue.put(pair)
            await asyncio.sleep(max(0.0, start + period - time.monotonic()))
            next(rounds)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    return done


async def legacy_pattern(store: EtcdStore, keys: Keys, pairs: list[tuple[str, str]], seconds: float,
                         gateway_id: str = "legacy-gw") -> None:
    """The previous accounting's writes: every pair's Usage and every model's Demand, every 5 s."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        start = time.monotonic()
        n += 1
        ops = [Op.put(keys.usage_entry(kid, model, gateway_id),
                      Usage(key_id=kid, model=model, gateway_id=gateway_id, requests=2 * n, prompt_tokens=24 * n,
                            completion_tokens=4 * n, updated_unix_ms=int(time.time() * 1000)).SerializeToString())
               for kid, model in pairs]
        ops += [Op.put(keys.demand_entry(m, gateway_id),
                       Demand(model=m, gateway_id=gateway_id, requests_per_second=1.5, window_seconds=60,
                              updated_unix_ms=int(time.time() * 1000)).SerializeToString())
                for m in {m for _, m in pairs}]
        for i in range(0, len(ops), 100):
            await store.txn([], ops[i:i + 100])
        await asyncio.sleep(max(0.0, start + FLUSH_S - time.monotonic()))


class Rig:
    """etcd, sims and one gateway."""

    def __init__(self, tmp: Path, retention: str) -> None:
        self.tmp = tmp
        self.etcd = EtcdProcess.in_temp_dir(compaction_retention=retention).start()
        self.prefix = f"/bench-{uuid.uuid4().hex[:6]}"
        self.keys = Keys(self.prefix)
        self.sims = [Sim(m, tmp, "--ttft-ms", "0", "--tokens-per-s", "0") for m in MODELS]
        self.gateway: tuple[object, str] | None = None

    async def start_gateway(self, store: EtcdStore) -> str:
        for sim in self.sims:
            rec = instance_record(sim.model, f"{sim.model}-1", sim.url)
            await store.put(self.keys.instance(sim.model, f"{sim.model}-1"), rec.SerializeToString())
        proc, url = start_gateway(self.etcd.endpoint, self.prefix, self.tmp)
        self.gateway = (proc, url)
        return url

    def stop(self) -> None:
        if self.gateway is not None:
            stop(self.gateway[0], timeout=20)  # type: ignore[arg-type]
        for sim in self.sims:
            sim.stop()
        self.etcd.stop()


async def measure(rig: Rig, store: EtcdStore, name: str, pairs: int, seconds: float, run: object) -> Phase:
    puts0, txns0 = etcd_metric(rig.etcd, "etcd_mvcc_put_total"), etcd_metric(rig.etcd, "etcd_mvcc_txn_total")
    t0 = time.monotonic()
    requests = await run  # type: ignore[misc]
    elapsed = time.monotonic() - t0
    puts = etcd_metric(rig.etcd, "etcd_mvcc_put_total") - puts0
    txns = etcd_metric(rig.etcd, "etcd_mvcc_txn_total") - txns0
    return Phase(name, pairs, elapsed, puts, txns, int(requests or 0))


async def soak(rig: Rig, minutes: float, run_minute: object) -> tuple[list[float], list[float]]:
    sizes, in_use = [], []
    for _ in range(int(minutes)):
        await run_minute()  # type: ignore[operator]
        sizes.append(etcd_metric(rig.etcd, "etcd_mvcc_db_total_size_in_bytes") / 2**20)
        in_use.append(etcd_metric(rig.etcd, "etcd_mvcc_db_total_size_in_use_in_bytes") / 2**20)
        print(f"  soak minute {len(sizes)}: db {sizes[-1]:.2f} MiB, in use {in_use[-1]:.2f} MiB", flush=True)
    return sizes, in_use


async def main(args: argparse.Namespace) -> list[Phase]:
    tmp = Path(tempfile.mkdtemp(prefix="mp-usage-bench-"))
    phases: list[Phase] = []
    sizes = sorted(args.pairs)
    rig = Rig(tmp, args.compaction_retention)
    try:
        store = await EtcdStore(EtcdConfig(endpoints=(rig.etcd.endpoint,), prefix=rig.prefix)).connect()
        url = await rig.start_gateway(store)
        all_keys = await make_keys(store, rig.keys, max(sizes) // len(MODELS))
        await asyncio.sleep(3)  # the gateway loads the keys
        for p in sizes:
            pairs = [(s, m) for (s, _), m in itertools.product(all_keys[:p // len(MODELS)], MODELS)]
            await drive(url, pairs, FLUSH_S)             # warm: every pair known
            phases.append(await measure(rig, store, "new", p, args.seconds, drive(url, pairs, args.seconds)))
            ids = [(kid, m) for (_, kid), m in itertools.product(all_keys[:p // len(MODELS)], MODELS)]
            phases.append(await measure(rig, store, "baseline", p, args.seconds,
                                        legacy_pattern(store, Keys(rig.prefix + "-legacy"), ids, args.seconds)))
            for ph in phases[-2:]:
                print(f"{ph.name:8s} {ph.pairs:4d} pairs: {ph.puts_per_minute:8.1f} puts/min "
                      f"({ph.puts:.0f} puts, {ph.txns:.0f} txns in {ph.seconds:.0f} s, {ph.requests} requests)",
                      flush=True)
        if args.soak_minutes > 0:
            p = max(sizes)
            pairs = [(s, m) for (s, _), m in itertools.product(all_keys[:p // len(MODELS)], MODELS)]
            t0 = time.monotonic()
            print(f"soak: {p} pairs through the gateway for {args.soak_minutes} min", flush=True)
            s, u = await soak(rig, args.soak_minutes, lambda: drive(url, pairs, 60))
            phases.append(Phase("soak-new", p, time.monotonic() - t0, 0, 0, db_size_mb=s, db_in_use_mb=u))
        await store.close()
    finally:
        rig.stop()
    if args.soak_minutes > 0 and args.baseline_soak:
        etcd = EtcdProcess.in_temp_dir(compaction_retention=args.compaction_retention).start()
        try:
            store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix="/bench-legacy")).connect()
            p = max(sizes)
            ids = [(f"{i:08x}", m) for i, m in itertools.product(range(p // len(MODELS)), MODELS)]
            print(f"soak: the baseline pattern at {p} pairs for {args.soak_minutes} min", flush=True)
            fake = Rig.__new__(Rig)
            fake.etcd = etcd
            t0 = time.monotonic()
            s, u = await soak(fake, args.soak_minutes, lambda: legacy_pattern(store, Keys("/bench-legacy"), ids, 60))
            phases.append(Phase("soak-baseline", p, time.monotonic() - t0, 0, 0, db_size_mb=s, db_in_use_mb=u))
            await store.close()
        finally:
            etcd.stop()
    return phases


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[50, 500], help="active (key, model) pairs (x5 models)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement per phase")
    ap.add_argument("--soak-minutes", type=float, default=10.0, help="0: no soak")
    ap.add_argument("--no-baseline-soak", dest="baseline_soak", action="store_false")
    ap.add_argument("--compaction-retention", default="5m", help="etcd --auto-compaction-retention")
    ap.add_argument("--json", type=Path, help="write the results here")
    result = asyncio.run(main(ap.parse_args()))
    by = {(ph.name, ph.pairs): ph for ph in result}
    print("\n| pairs | puts/min (new) | puts/min (baseline) | new / baseline |\n|---|---|---|---|")
    for p in sorted({ph.pairs for ph in result if ph.name == "new"}):
        new, base = by[("new", p)], by[("baseline", p)]
        print(f"| {p} | {new.puts_per_minute:.1f} | {base.puts_per_minute:.1f} | "
              f"{new.puts_per_minute / base.puts_per_minute:.3f} |")
    for name in ("soak-new", "soak-baseline"):
        for ph in result:
            if ph.name == name:
                print(f"{name}: db size {ph.db_size_mb[-1]:.2f} MiB (max {max(ph.db_size_mb):.2f}), "
                      f"in use {ph.db_in_use_mb[-1]:.2f} MiB after {len(ph.db_size_mb)} min")
    args_json = ap.parse_args().json
    if args_json:
        args_json.write_text(json.dumps([asdict(ph) | {"puts_per_minute": ph.puts_per_minute} for ph in result],
                                        indent=2))
