"""What one gateway writes to etcd, and how it learns the fleet size.

    LeaseSession ──granted──▶ put gateways/<id> (GatewayRecord, on the lease)
         │ lost ──▶ re-grant ──▶ re-register; demand records follow on the next tick
    watch gateways/ ──▶ N live gateways ──▶ on_size(N)   (rate limits enforce limit/N)
    every demand_interval_s ──▶ put demand/<model>/<id> (on the lease), delete idle models' keys
    every usage_flush_s     ──▶ put usage/<key>/<model>/<id> (no lease: history outlives us)

Every loop runs under the gateway's loop runner (controlplane/loops.py): each step is timed,
logged and retried with backoff, and shows in /readyz; an etcd outage only delays the writes
(usage entries stay dirty until a flush succeeds). Closing revokes the lease, so the
gateway and demand records vanish at once on a clean shutdown and after one TTL otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from controlplane.keys import Keys, RecordDecodeError, decode
from controlplane.loops import Backoff, Loop, Supervisor
from controlplane.pb import GatewayRecord, Usage
from controlplane.store import EtcdStore, LeaseLost, LeaseSession, Op, StoreError
from controlplane.store.cache import CacheEvent, WatchedCache, proto_decoder
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
        self.members = WatchedCache(store, keys.gateways, proto_decoder(GatewayRecord), name="watch-gateways",
                                    handlers=(self._on_members,))
        self._loops: list[Loop] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, loops: Supervisor) -> None:
        """Seed usage from earlier runs of this gateway id, then start every loop under ``loops``."""
        await self._seed_usage()
        self.session.start()
        backoff = Backoff(base_s=0.5, max_s=min(self.settings.demand_interval_s, self.settings.usage_flush_s))
        self._loops = [
            self.members.start(loops),
            loops.periodic("demand", self._guarded(self.publish_demand), interval_s=self.settings.demand_interval_s,
                           timeout_s=self.settings.demand_interval_s * 2, backoff=backoff, run_first=False),
            loops.periodic("usage-flush", self._guarded(self.flush_usage), interval_s=self.settings.usage_flush_s,
                           timeout_s=self.settings.usage_flush_s * 2, backoff=backoff, run_first=False),
        ]

    async def close(self) -> None:
        """Stop the loops, flush usage one last time, revoke the lease (its records vanish)."""
        for loop in self._loops:
            await loop.stop()
        try:
            await asyncio.wait_for(self.flush_usage(), 3.0)
        except (StoreError, TimeoutError) as exc:
            log.warning("final usage flush failed", error=str(exc))
        await self.session.close()

    def _guarded(self, step: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """``step``, telling the lease session when etcd says our lease is gone."""
        async def run() -> None:
            try:
                await step()
            except LeaseLost:
                self.session.mark_lost()
                raise
        run.__name__ = getattr(step, "__name__", "step")
        return run

    # -- registration and fleet size ---------------------------------------------------------

    async def _register(self, lease_id: int) -> None:
        rec = GatewayRecord(gateway_id=self.gateway_id, address=self.address, started_unix_ms=self.started_ms)
        await self.store.put(self.keys.gateway(self.gateway_id), rec.SerializeToString(), lease=lease_id)
        self._published.clear()  # demand keys died with the old lease; republish on the next tick
        log.info("gateway registered", gateway_id=self.gateway_id, lease=hex(lease_id))

    def _on_members(self, _: CacheEvent[GatewayRecord]) -> None:
        size = max(1, len(self.members.items) + len(self.members.bad_keys))  # a bad record is still a gateway
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
