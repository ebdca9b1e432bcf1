"""What one gateway writes to etcd, and what it learns from the other gateways.

    LeaseSession ──granted──▶ put gateways/<id> (GatewayRecord, on the lease)
         │ lost ──▶ re-grant ──▶ re-register; the compactor leadership is dropped
    watch gateways/ ──▶ N live gateways and their published key loads ──▶ RateLimiter (shares)
    every publish_interval_s ──▶ put gateways/<id> again IF its demand or key loads changed
                                 (one record per gateway: planner demand + limit load; idle: no writes)
    every usage_flush_s      ──▶ txn[mod(part) == last] put accounting/writers/<writer>/<day>/<part>
                                 (dirty parts only, at most usage_max_parts; no lease)
    every compact_interval_s ──▶ campaign for accounting/leader (on our lease); the leader folds
                                 gone writers, old days and legacy records (controlplane/accounting)

Every loop runs under the gateway's loop runner (controlplane/loops.py): each step is timed,
logged and retried with backoff, and shows in /readyz; an etcd outage only delays the writes
(usage parts stay dirty until a flush succeeds). Closing writes every usage part once more,
marked final, then revokes the lease, so the gateway record vanishes at once and the compactor
folds our usage without waiting.

etcd writes per minute of one gateway (docs/gateway.md has the arithmetic): at most
60 / publish_interval_s for its record (30 at 2 s) plus usage_max_parts * 60 / usage_flush_s for
usage (24 at 2 parts, 5 s; 12 while a day fits one part), plus the leader's folds (a few per
day). The number of active (key, model) pairs changes the size of a usage part, not the count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from controlplane.accounting.blocks import day_of
from controlplane.accounting.compact import CompactReport, CompactSettings, compact_usage
from controlplane.keys import Keys, RecordDecodeError, decode
from controlplane.leader import Leadership
from controlplane.loops import Backoff, Loop, Supervisor
from controlplane.pb import GatewayRecord, KeyLoad, UsageBlock
from controlplane.store import Cmp, EtcdStore, LeaseLost, LeaseSession, Op, StoreError, TxnConflict
from controlplane.store.cache import CacheEvent, Replaced, WatchedCache, proto_decoder
from gateway.limits import WINDOW_S, RateLimiter, peers_from
from gateway.usage import DemandMeter, PartWrite, UsageBook

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FleetSettings:
    """Lease and write cadence of one gateway."""

    lease_ttl_s: int = 10
    publish_interval_s: float = 2.0        # GatewayRecord (demand + key loads), only when changed
    usage_flush_s: float = 5.0
    usage_max_parts: int = 2               # usage parts per flush (a day needs a second part past ~10k pairs)
    usage_bytes_per_s: int = 32 * 1024     # flushes slow down so usage writes stay under this
    compact_interval_s: float = 60.0
    compact: CompactSettings = field(default_factory=CompactSettings)


class FleetMember:
    """This gateway's registration, fleet watch, and periodic record, usage and compaction writes."""

    def __init__(self, store: EtcdStore, keys: Keys, gateway_id: str, address: str, settings: FleetSettings,
                 usage: UsageBook, demand: DemandMeter, limiter: RateLimiter,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.gateway_id = gateway_id
        self.address = address
        self.settings = settings
        self.usage = usage
        self.demand = demand
        self.limiter = limiter
        self.clock = clock                      # wall clock: usage days, record times, compaction
        self.size = 1
        self.started_ms = int(time.time() * 1000)
        self.session = LeaseSession(store, settings.lease_ttl_s, on_granted=self._register, on_lost=self._lost,
                                    name="gateway")
        self.leadership = Leadership(store, keys.usage_leader, usage.writer, role="usage compactor")
        self.members = WatchedCache(store, keys.gateways, proto_decoder(GatewayRecord), name="watch-gateways",
                                    handlers=(self._on_members,))
        self.last_compaction: CompactReport | None = None
        self.records_written = 0
        self._own_key = keys.gateway(gateway_id)
        self._peer_loads: dict[str, Sequence[KeyLoad]] = {}
        self._last_content = b""
        self._loops: list[Loop] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, loops: Supervisor) -> None:
        """Start the lease session and every loop under ``loops``."""
        self.session.start()
        s = self.settings
        backoff = Backoff(base_s=0.5, max_s=max(s.publish_interval_s, s.usage_flush_s))
        self._loops = [
            self.members.start(loops),
            loops.periodic("publish", self._guarded(self.publish), interval_s=s.publish_interval_s,
                           timeout_s=max(4.0, s.publish_interval_s * 2), backoff=backoff, run_first=False),
            loops.periodic("usage-flush", self._guarded(self.flush_usage), interval_s=s.usage_flush_s,
                           timeout_s=max(6.0, s.usage_flush_s * 2), backoff=backoff, run_first=False),
            loops.periodic("usage-compact", self._guarded(self.compact), interval_s=s.compact_interval_s,
                           timeout_s=max(30.0, s.compact_interval_s), backoff=Backoff(base_s=1.0, max_s=60.0),
                           run_first=False),
        ]

    async def close(self) -> None:
        """Stop the loops, write every usage part once more (final), revoke the lease."""
        for loop in self._loops:
            await loop.stop()
        try:
            await asyncio.wait_for(self.flush_usage(final=True), 5.0)
        except (StoreError, TimeoutError) as exc:
            log.warning("final usage flush failed; the counts since the last flush are lost",
                        error=str(exc), dirty_parts=self.usage.dirty_parts)
        self.leadership.lost()
        await self.session.close()

    def _guarded(self, step: Callable[[], Awaitable[float | None]]) -> Callable[[], Awaitable[float | None]]:
        """``step``, telling the lease session when etcd says our lease is gone."""
        async def run() -> float | None:
            try:
                return await step()
            except LeaseLost:
                self.session.mark_lost()
                raise
        run.__name__ = getattr(step, "__name__", "step")
        return run

    # -- registration, fleet size and peers' load ---------------------------------------------

    def _record(self, now_ms: int) -> GatewayRecord:
        demand = self.demand.snapshot("", time.monotonic(), now_ms)
        for d in demand.values():
            d.ClearField("gateway_id")       # it is this record's
            d.ClearField("updated_unix_ms")
        return GatewayRecord(gateway_id=self.gateway_id, address=self.address, started_unix_ms=self.started_ms,
                             usage_writer=self.usage.writer, updated_unix_ms=now_ms,
                             demand=[demand[m] for m in sorted(demand)], keys=self.limiter.loads(time.monotonic()),
                             limit_window_seconds=WINDOW_S)

    async def _register(self, lease_id: int) -> None:
        rec = self._record(int(time.time() * 1000))
        await self.store.put(self._own_key, rec.SerializeToString(), lease=lease_id)
        self._published(rec)
        log.info("gateway registered", gateway_id=self.gateway_id, lease=hex(lease_id), usage_writer=self.usage.writer)

    async def _lost(self) -> None:
        self.leadership.lost()

    def _on_members(self, event: CacheEvent[GatewayRecord]) -> None:
        if isinstance(event, Replaced):
            self._peer_loads = {k: list(r.keys) for k, r in event.items.items() if k != self._own_key}
        else:
            for k in event.deletes | event.bad:
                self._peer_loads.pop(k, None)
            for k, r in event.upserts.items():
                if k != self._own_key:
                    self._peer_loads[k] = list(r.keys)
        self.limiter.set_peers(peers_from(self._peer_loads.values()))
        size = max(1, len(self.members.items) + len(self.members.bad_keys))  # a bad record is still a gateway
        if size != self.size:
            log.info("fleet size changed", gateways=size, was=self.size)
            self.size = size
            self.limiter.set_fleet_size(size)

    # -- periodic writes ---------------------------------------------------------------------

    async def publish(self) -> None:
        """Rewrite our GatewayRecord when its demand or key loads changed (never while idle)."""
        lease = self.session.lease_id
        if not lease:
            return
        rec = self._record(int(time.time() * 1000))
        if _content(rec) == self._last_content:
            return
        await self.store.put(self._own_key, rec.SerializeToString(), lease=lease)
        self._published(rec)

    def _published(self, rec: GatewayRecord) -> None:
        self._last_content = _content(rec)
        self.records_written += 1
        self.limiter.set_published({kl.key_id: (kl.request_demand, kl.token_demand) for kl in rec.keys})

    async def flush_usage(self, *, final: bool = False) -> float | None:
        """Write the dirty usage parts (compare-and-swap); returns the delay until the next flush."""
        s = self.settings
        writes = self.usage.pending(None if final else s.usage_max_parts, final=final)
        written = 0
        if writes:
            written = await self._write(writes)
            if written < 0:      # lost a compare: reconciled with what etcd holds; write again now
                written = await self._write(self.usage.pending(None if final else s.usage_max_parts, final=final))
                if written < 0:
                    raise TxnConflict("usage parts changed under us twice in a row; retrying")
        self.usage.drop_finished(day_of(self.clock()))
        return max(s.usage_flush_s, written / max(1, s.usage_bytes_per_s))

    async def _write(self, writes: list[PartWrite]) -> int:
        """One transaction writing ``writes``; bytes written, or -1 when a compare failed (then
        every part of it is reconciled with what etcd holds)."""
        if not writes:
            return 0
        now_ms = int(self.clock() * 1000)
        keys = [self.keys.usage_writer_part(self.usage.writer, w.day, w.part) for w in writes]
        values = [w.record(self.usage.writer, self.gateway_id, now_ms).SerializeToString() for w in writes]
        try:
            ok, rev = await self.store.txn(
                [Cmp.mod_revision(k, w.expected_mod) for k, w in zip(keys, writes, strict=True)],
                [Op.put(k, v) for k, v in zip(keys, values, strict=True)])
        except StoreError:
            self.usage.unanswered(writes)
            raise
        if ok:
            self.usage.written(writes, rev, time.monotonic())
            return sum(len(v) for v in values)
        for key, w in zip(keys, writes, strict=True):
            kv = await self.store.get(key)
            found: UsageBlock | None = None
            if kv is not None:
                try:
                    found = decode(UsageBlock, kv)
                except RecordDecodeError as exc:
                    log.error("our usage record does not decode; replacing it", key=key, error=str(exc))
                    found = UsageBlock(writer="(undecodable)")
            if not self.usage.resolve(w, found, kv.mod_revision if kv is not None else 0):
                log.error("another writer wrote our usage record; keeping its counts and adding ours", key=key,
                          other=found.writer if found else "")
        return -1

    async def compact(self) -> None:
        """Campaign for the usage compactor; while leader, run one fenced compaction."""
        lease = self.session.lease_id
        if not lease:
            return
        if not self.leadership.is_leader and not await self.leadership.campaign(lease):
            return
        if not await self.leadership.still_leader() or self.leadership.fence is None:
            return
        self.last_compaction = await compact_usage(self.store, self.keys, self.clock(), self.settings.compact,
                                                   fence=self.leadership.fence)
        for problem in self.last_compaction.undecodable:
            log.error("usage record does not decode; left as it is (not counted by ctl usage)", problem=problem)


def _content(rec: GatewayRecord) -> bytes:
    """A record's bytes without its timestamp: what decides whether it must be written again."""
    copy = GatewayRecord()
    copy.CopyFrom(rec)
    copy.ClearField("updated_unix_ms")
    return copy.SerializeToString(deterministic=True)
