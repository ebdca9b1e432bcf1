"""The agent's keys in etcd, kept equal to what the agent wants them to be, on its one lease.

The agent states what its keys *should* hold (``set`` / ``remove``); a level-triggered loop makes
etcd agree, on the current lease. When the lease is (re-)granted, ``on_granted`` writes every key
in one transaction before the session reports itself alive, so after an etcd outage the whole
registration reappears at once. Liveness is the lease keepalive; nothing here writes periodically
unless a value changed.

    set()/remove() ──▶ wanted ──(loop "registration", on change or every resync_s)──▶ etcd (lease L)
                          ▲                                                 │
                          └──── on_granted(L'): published := {} ; write all ┘
"""

from __future__ import annotations

import asyncio

import structlog

from controlplane.loops import Backoff, PeriodicLoop, Supervisor
from controlplane.store import EtcdStore, LeaseLost, LeaseSession, Op, StoreError

log = structlog.get_logger(__name__)


class Registration:
    """Desired contents of this agent's keys, and the loop that publishes them."""

    def __init__(self, store: EtcdStore, *, resync_s: float = 5.0) -> None:
        self.store = store
        self.session: LeaseSession | None = None
        self.resync_s = resync_s
        self._wanted: dict[str, bytes] = {}
        self._published: dict[str, bytes] = {}
        self._lease = 0
        self._changed = asyncio.Event()
        self._synced = asyncio.Condition()
        self._lock = asyncio.Lock()

    def set(self, key: str, value: bytes) -> None:
        """Want ``key`` to hold ``value`` (published soon; ``flush`` waits for it)."""
        if self._wanted.get(key) != value:
            self._wanted[key] = value
            self._changed.set()

    def remove(self, key: str) -> None:
        """Want ``key`` gone."""
        if self._wanted.pop(key, None) is not None or key in self._published:
            self._changed.set()

    @property
    def in_sync(self) -> bool:
        """True when etcd holds exactly what is wanted, on a live lease."""
        return bool(self._lease) and self._published == self._wanted

    async def on_granted(self, lease_id: int) -> None:
        """LeaseSession hook: write every wanted key on the new lease, atomically."""
        async with self._lock:
            self._lease, self._published = lease_id, {}
            # Publish a snapshot: set() may run while the txn is in flight, and what it changes
            # must still look unpublished to the sync loop afterwards.
            snapshot = dict(self._wanted)
            ops = [Op.put(k, v, lease=lease_id) for k, v in snapshot.items()]
            if ops:
                await self.store.txn([], ops)
            self._published = snapshot
            if self._wanted != snapshot:
                self._changed.set()
            log.info("registered", keys=len(ops), lease=hex(lease_id))
        async with self._synced:
            self._synced.notify_all()

    async def on_lost(self) -> None:
        """LeaseSession hook: every key vanished with the lease."""
        self._lease, self._published = 0, {}

    async def sync_once(self) -> bool:
        """Make etcd match what is wanted; True when in sync afterwards."""
        session = self.session
        if session is None or not session.alive or not self._lease:
            return False
        async with self._lock:
            lease = self._lease
            wanted = dict(self._wanted)
            puts = [Op.put(k, v, lease=lease) for k, v in wanted.items() if self._published.get(k) != v]
            deletes = [Op.delete(k) for k in self._published if k not in wanted]
            if not puts and not deletes:
                return True
            try:
                await self.store.txn([], [*puts, *deletes])
            except LeaseLost:
                session.mark_lost()
                return False
            self._published = wanted
        async with self._synced:
            self._synced.notify_all()
        return True

    def start(self, loops: Supervisor) -> PeriodicLoop:
        """Publish changes forever as the supervised loop ``registration`` (woken by every change)."""
        return loops.periodic("registration", self.step, interval_s=self.resync_s, wake=self._changed,
                              timeout_s=max(10.0, self.resync_s), backoff=Backoff(base_s=0.1, max_s=5.0))

    async def step(self) -> None:
        """One sync; fails (so the runner retries with backoff) while a live lease is not in sync."""
        ok = await self.sync_once()
        if not ok and self.session is not None and self.session.alive:
            raise StoreError("registration not in sync on the current lease; retrying")

    async def flush(self, timeout: float) -> bool:
        """Wait until etcd holds what is wanted (True) or ``timeout`` passes (False)."""
        self._changed.set()
        try:
            async with asyncio.timeout(timeout):
                async with self._synced:
                    await self._synced.wait_for(lambda: self.in_sync)
        except TimeoutError:
            return False
        return True
