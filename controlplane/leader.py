"""Leader election on one etcd key, and the fence that makes a deposed leader's writes fail.

    LeaseSession (TTL) ──▶ campaign: txn[key absent] put(identity, lease) ──▶ Fence(create_rev, identity)
          │ lost ──▶ fence dropped                                              │
          ▼                                                                     ▼
    still_leader(): re-read the key; ours iff create revision and value match    every write: txn[fence.cmps() + …]

Winning once does not make a leader safe: a leader that stalls (GC pause, a blocked solver, an
etcd partition) may have lost its lease while it still believes it leads. Every write of the
leader is therefore a transaction that also compares the leader key's create revision and value
with the ones it won (``Fence.cmps``), so a deposed leader writes nothing. Closing the session
revokes the lease, which deletes the key at once, so a standby takes over within its campaign
interval. Used by `ctl planner run` (``planner/leader``) and `ctl harvest run` (``harvest/leader``).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from controlplane.store import Cmp, EtcdStore, LeaseSession, Op

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Fence:
    """An extra guard from the caller: ``key`` still exists with this create revision and value
    (a leader's key: a deposed leader's writes fail)."""

    key: str
    create_revision: int
    value: bytes

    def cmps(self) -> list[Cmp]:
        """The compares for this fence."""
        return [Cmp.create_revision(self.key, self.create_revision), Cmp.value(self.key, self.value)]


class Leadership:
    """One campaigner for ``key``: put-if-absent on the session's lease, then fenced writes.

    The owner runs the session (``session.start()`` / ``close()``) and wires the session's
    ``on_lost`` to ``lost``; ``fence`` is None while not leading.
    """

    def __init__(self, store: EtcdStore, key: str, identity: str, *, role: str) -> None:
        self.store = store
        self.key = key
        self.identity = identity
        self.role = role
        self.fence: Fence | None = None
        self.terms = 0                      # times this campaigner became leader

    @property
    def is_leader(self) -> bool:
        """True while this campaigner believes it holds the key (writes are fenced regardless)."""
        return self.fence is not None

    def lost(self) -> None:
        """The lease is gone: whatever we held, we no longer lead."""
        if self.fence is not None:
            log.warning(f"{self.role} lease lost; no longer leader", identity=self.identity)
        self.fence = None

    async def campaign(self, lease_id: int) -> bool:
        """Put the leader key if absent, on ``lease_id``; True when we now lead."""
        me = self.identity.encode()
        ok, rev = await self.store.txn([Cmp.absent(self.key)], [Op.put(self.key, me, lease=lease_id)])
        if ok:
            self.fence = Fence(self.key, rev, me)
            self.terms += 1
            log.info(f"became {self.role} leader", identity=self.identity, revision=rev)
        return ok

    async def still_leader(self) -> bool:
        """Re-read the leader key; drop leadership when it is no longer ours."""
        if self.fence is None:
            return False
        kv = await self.store.get(self.fence.key)
        if kv is None or kv.create_revision != self.fence.create_revision or kv.value != self.fence.value:
            log.warning(f"{self.role} leadership lost", identity=self.identity,
                        holder=kv.value.decode(errors="replace") if kv else None)
            self.fence = None
        return self.fence is not None

    async def holder(self) -> str | None:
        """Who holds the key now (None: nobody)."""
        kv = await self.store.get(self.key)
        return kv.value.decode(errors="replace") if kv is not None else None


async def wait_lease(session: LeaseSession, timeout: float = 1.0) -> int:
    """The session's lease id, or 0 when it has none within ``timeout`` (etcd away)."""
    try:
        return await session.wait_alive(timeout=timeout)
    except TimeoutError:
        return 0
