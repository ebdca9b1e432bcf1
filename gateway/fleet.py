"""What one gateway writes to etcd, and how it learns the fleet size.

    LeaseSession ──granted──▶ put gateways/<id> (GatewayRecord, on the lease)
         │ lost ──▶ re-grant ──▶ re-register; demand records follow on the next tick
    watch gateways/ ──▶ N live gateways ──▶ on_size(N)   (rate limits enforce limit/N)
    every demand_interval_s ──▶ put demand/<model>/<id> (on the lease), delete idle models' keys
    every usage_flush_s     ──▶ put usage/<key>/<model>/<id> (no lease: history outlives us)

Each loop step is wrapped, logged and retried on the next tick; an etcd outage only delays the
writes (usage entries stay dirty until a flush succeeds). Closing revokes the lease, so the
gateway and demand records vanish at once on a clean shutdown and after one TTL otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from controlplane.keys import Keys, RecordDecodeError, decode
from controlplane.pb import GatewayRecord, Usage
from controlplane.store import Changes, EtcdStore, LeaseLost, LeaseSession, Op, Resync, StoreError, watch_prefix
from gateway.usage import DemandMeter, UsageBook

log = structlog.get_logger(__name__)

MAX_TXN_OPS = 100   # etcd's default --max-txn-ops is 128


@dataclass(frozen=True)
class FleetSettings:
    """Lease and write cadence of one gateway."""

    lease_ttl_s: int = 10
    demand_interval_s: float = 5.0
    usage_flush_s: float = 5.0


class FleetMember:
    """This gateway's registration, fleet-size watch, and periodic demand and usage writes."""

    def __init__(self, store: EtcdStore, keys: Keys, gateway_id: str, address: str, settings: FleetSettings,
                 usage: UsageBook, demand: DemandMeter, on_size: Callable[[int], None]) -> None:
        self.store = store
        self.keys = keys
        self.gateway_id = gateway_id
        self.address = address
        self.settings = settings
        self.usage = usage
        self.demand = demand
        self.on_size = on_size
        self.size = 1
        self.started_ms = int(time.time() * 1000)
        self.session = LeaseSession(store, settings.lease_ttl_s, on_granted=self._register, name="gateway")
        self._published: set[str] = set()
        self._members: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Seed usage from earlier runs of this gateway id, then start every loop."""
        await self._seed_usage()
        self.session.start()
        self._tasks = [
            asyncio.create_task(self._watch_members(), name="watch-gateways"),
            asyncio.create_task(self._every(self.settings.demand_interval_s, self.publish_demand), name="demand"),
            asyncio.create_task(self._every(self.settings.usage_flush_s, self.flush_usage), name="usage-flush"),
        ]

    async def close(self) -> None:
        """Stop the loops, flush usage one last time, revoke the lease (its records vanish)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        try:
            await asyncio.wait_for(self.flush_usage(), 3.0)
        except (StoreError, TimeoutError) as exc:
            log.warning("final usage flush failed", error=str(exc))
        await self.session.close()

    async def _every(self, interval: float, step: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()  # type: ignore[misc]
            except LeaseLost:
                self.session.mark_lost()
            except StoreError as exc:
                log.warning("periodic etcd write failed; retrying next tick", step=getattr(step, "__name__", ""),
                            error=str(exc))
            except Exception:  # a bug in one tick must not stop the loop
                log.exception("periodic step failed", step=getattr(step, "__name__", ""))

    # -- registration and fleet size ---------------------------------------------------------

    async def _register(self, lease_id: int) -> None:
        rec = GatewayRecord(gateway_id=self.gateway_id, address=self.address, started_unix_ms=self.started_ms)
        await self.store.put(self.keys.gateway(self.gateway_id), rec.SerializeToString(), lease=lease_id)
        self._published.clear()  # demand keys died with the old lease; republish on the next tick
        log.info("gateway registered", gateway_id=self.gateway_id, lease=hex(lease_id))

    async def _watch_members(self) -> None:
        async for update in watch_prefix(self.store, self.keys.gateways):
            if isinstance(update, Resync):
                self._members = set(update.items)
            elif isinstance(update, Changes):
                for change in update.changes:
                    if change.kv is None:
                        self._members.discard(change.key)
                    else:
                        self._members.add(change.key)
            size = max(1, len(self._members))
            if size != self.size:
                log.info("fleet size changed", gateways=size, was=self.size)
                self.size = size
                self.on_size(size)

    # -- periodic writes ---------------------------------------------------------------------

    async def publish_demand(self) -> None:
        """Write demand of active models on the lease; delete records of models gone idle."""
        lease = self.session.lease_id
        if not lease:
            return
        now = time.time()
        current = self.demand.snapshot(self.gateway_id, time.monotonic(), int(now * 1000))
        ops = [Op.put(self.keys.demand_entry(m, self.gateway_id), d.SerializeToString(), lease=lease)
               for m, d in current.items()]
        ops += [Op.delete(self.keys.demand_entry(m, self.gateway_id)) for m in self._published - set(current)]
        for i in range(0, len(ops), MAX_TXN_OPS):
            await self.store.txn([], ops[i:i + MAX_TXN_OPS])
        self._published = set(current)

    async def flush_usage(self) -> None:
        """Write the usage entries that changed since the last flush (cumulative, no lease)."""
        records = self.usage.take_dirty(self.gateway_id, int(time.time() * 1000))
        try:
            for i in range(0, len(records), MAX_TXN_OPS):
                batch = records[i:i + MAX_TXN_OPS]
                await self.store.txn([], [Op.put(self.keys.usage_entry(r.key_id, r.model, self.gateway_id),
                                                 r.SerializeToString()) for r in batch])
        except StoreError:
            self.usage.mark_dirty(records)
            raise

    async def _seed_usage(self) -> None:
        try:
            kvs, _ = await self.store.list_prefix(self.keys.usage)
        except StoreError as exc:
            log.warning("could not read earlier usage of this gateway id; counting from zero", error=str(exc))
            return
        mine = []
        for kv in kvs:
            try:
                rec = decode(Usage, kv)
            except RecordDecodeError as exc:
                log.warning("skipping undecodable usage record", error=str(exc))
                continue
            if rec.gateway_id == self.gateway_id:
                mine.append(rec)
        self.usage.seed(mine)
