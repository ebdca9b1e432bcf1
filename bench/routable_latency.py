"""How long from an etcd write of a READY instance until the gateway routes to it (and back).

Starts a real etcd, one sim engine and one `ctl gateway`, then N times: write a READY record for
a fresh model name and poll ``GET /v1/models/<model>`` on the gateway until it answers 200
(then delete the record and poll until 404). As a baseline measured in the same run, a bare
etcd watch on the same prefix times the same writes. Prints p50/p99/max in milliseconds.

    python bench/routable_latency.py --rounds 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.store import Changes, EtcdConfig, EtcdStore, watch_prefix
from tests.cluster import Sim, instance_record, start_gateway, stop_all


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    etcd = EtcdProcess.in_temp_dir().start()
    prefix = "/bench"
    sim = Sim("bench", tmp)
    gw, url = start_gateway(etcd.endpoint, prefix, tmp, "--no-auth")
    store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    seen: dict[str, float] = {}
    arrived = asyncio.Event()

    async def watcher() -> None:
        async for update in watch_prefix(store, keys.instances):
            if isinstance(update, Changes):
                for ch in update.changes:
                    seen[ch.key] = time.perf_counter()
                arrived.set()

    watch_task = asyncio.create_task(watcher())
    await asyncio.sleep(0.5)
    to_routable, to_unroutable, watch_lat = [], [], []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(rounds):
                model = f"m-{uuid.uuid4().hex[:8]}"
                key = keys.instance(model, "i1")
                t0 = time.perf_counter()
                await store.put(key, instance_record(model, "i1", sim.url).SerializeToString())
                while True:
                    async with http.get(f"{url}/v1/models/{model}") as r:
                        if r.status == 200:
                            break
                to_routable.append((time.perf_counter() - t0) * 1000)
                while key not in seen:
                    arrived.clear()
                    await arrived.wait()
                watch_lat.append((seen.pop(key) - t0) * 1000)
                t1 = time.perf_counter()
                await store.delete(key)
                while True:
                    async with http.get(f"{url}/v1/models/{model}") as r:
                        if r.status == 404:
                            break
                to_unroutable.append((time.perf_counter() - t1) * 1000)
    finally:
        watch_task.cancel()
        await store.close()
        stop_all([gw])
        sim.stop()
        etcd.stop()
    print(f"rounds: {rounds}")
    print(f"{'measure':<40} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, vals in (("etcd write -> bare watch event (baseline)", watch_lat),
                       ("etcd write -> routable at gateway", to_routable),
                       ("etcd delete -> not routable", to_unroutable)):
        print(f"{name:<40} {statistics.median(vals):8.2f} {pct(vals, 0.99):8.2f} {max(vals):8.2f}")
    print(f"ratio routable/baseline (p50): {statistics.median(to_routable) / statistics.median(watch_lat):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.rounds))


if __name__ == "__main__":
    main()
