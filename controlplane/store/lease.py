"""LeaseSession: one etcd lease per process, kept alive, re-granted after loss.

Modelled on etcd's clientv3/concurrency Session, with the two things an HPC agent needs on top:

* keepalives are scheduled against the lease's expiry (every TTL/3, minus jitter, and faster
  while they fail), so a slow or blinking etcd does not expire us early;
* losing the lease is an event, not an exit: the session re-grants a new lease as soon as etcd
  answers and calls ``on_granted(lease_id)`` so the owner re-registers its keys on it.

    start ──grant──▶ on_granted(id) ──▶ ALIVE ──keepalive every ~TTL/3──┐
      ▲                                   │ ◀──────────────────────────┘
      └──────── backoff ◀── LOST ◀── expiry passed / TTL<=0 / mark_lost()
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog
from etcd3aio import EtcdError

from controlplane.store.client import EtcdStore
from controlplane.store.errors import StoreError

log = structlog.get_logger(__name__)

GrantedHandler = Callable[[int], Awaitable[None]]
LostHandler = Callable[[], Awaitable[None]]


class LeaseSession:
    """Keeps one lease alive in the background; see the module docstring for the lifecycle."""

    def __init__(
        self,
        store: EtcdStore,
        ttl: int,
        *,
        on_granted: GrantedHandler | None = None,
        on_lost: LostHandler | None = None,
        name: str = "lease",
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        self.store = store
        self.ttl = ttl
        self.name = name
        self.on_granted = on_granted
        self.on_lost = on_lost
        self._clock = clock
        self._rng = rng
        self._lease_id = 0
        self._alive = asyncio.Event()
        self._lost_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.grants = 0
        self.losses = 0
        self.expires_at = 0.0

    @property
    def lease_id(self) -> int:
        """The current lease id; 0 while no lease is held."""
        return self._lease_id if self._alive.is_set() else 0

    @property
    def alive(self) -> bool:
        """True while a granted lease is believed valid."""
        return self._alive.is_set()

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease-session-{self.name}")

    async def wait_alive(self, timeout: float | None = None) -> int:
        """Wait until a lease is held (and registered); returns its id."""
        await asyncio.wait_for(self._alive.wait(), timeout)
        return self._lease_id

    def mark_lost(self) -> None:
        """Tell the session its lease is gone (e.g. a put answered 'lease not found')."""
        self._lost_now.set()

    async def close(self, *, revoke: bool = True) -> None:
        """Stop keepalives and revoke the lease, which deletes every key attached to it."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lease_id, self._lease_id = self._lease_id, 0
        was_alive = self._alive.is_set()
        self._alive.clear()
        if revoke and lease_id and was_alive:
            try:
                await self.store.client.lease.revoke(lease_id, timeout=2.0, max_attempts=1)  # type: ignore[union-attr]
                log.info("lease revoked", session=self.name, lease=hex(lease_id))
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, StoreError) as exc:
                log.warning("lease revoke failed; keys expire with the TTL", session=self.name, error=str(exc))

    # -- loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        # Retry grants no slower than TTL/3 (between 0.5 and 5 s): after an etcd outage the
        # registration is back within about a third of a TTL of etcd answering again.
        max_backoff = min(5.0, max(0.5, self.ttl / 3))
        backoff = 0.1
        while not self._closing:
            try:
                lease_id, granted_ttl = await self._grant()
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, StoreError) as exc:
                log.warning("lease grant failed; retrying", session=self.name, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            self._lease_id = lease_id
            self._lost_now.clear()
            if self.on_granted is not None:
                try:
                    await self.on_granted(lease_id)
                except Exception as exc:  # the handler is the owner's code: log it, regrant
                    log.warning("registration on new lease failed; re-granting", session=self.name,
                                error=str(exc), error_type=type(exc).__name__)
                    await self._revoke_quietly(lease_id)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, max_backoff)
                    continue
            backoff = 0.1
            self.grants += 1
            self._alive.set()
            log.info("lease granted", session=self.name, lease=hex(lease_id), ttl=granted_ttl, grants=self.grants)
            await self._keep_alive(lease_id, granted_ttl)
            self._alive.clear()
            self.losses += 1
            log.warning("lease lost; will re-grant and re-register", session=self.name, lease=hex(lease_id))
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except Exception as exc:  # owner's handler; never let it kill the loop
                    log.warning("lease-lost handler failed", session=self.name, error=str(exc))

    async def _grant(self) -> tuple[int, int]:
        sent = self._clock()
        resp = await self.store.client.lease.grant(self.ttl, timeout=self.store.config.timeout_s)  # type: ignore[union-attr]
        self.expires_at = sent + int(resp.TTL)
        return int(resp.ID), int(resp.TTL)

    async def _keep_alive(self, lease_id: int, ttl: int) -> None:
        """Renew until the lease is lost; returns when it is."""
        failing = False
        while True:
            remaining = self.expires_at - self._clock()
            if remaining <= 0:
                return
            # Failing: retry fast while time is left. Healthy: renew at TTL/3 with jitter (never later).
            delay = min(0.5, remaining / 4) if failing else ttl / 3 * (1 - 0.25 * self._rng())
            lost_wait = asyncio.create_task(self._lost_now.wait())
            try:
                done, _ = await asyncio.wait({lost_wait}, timeout=max(0.05, min(delay, remaining)))
            finally:  # also when close() cancels us here: no waiter task left behind
                lost_wait.cancel()
            if done:
                return
            if self.expires_at - self._clock() <= 0:
                return
            sent = self._clock()
            try:
                new_ttl = await asyncio.wait_for(self._keepalive_once(lease_id), max(0.2, self.expires_at - sent))
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, StoreError) as exc:
                if not failing:
                    log.warning("lease keepalive failing; retrying until expiry", session=self.name,
                                error=str(exc) or type(exc).__name__, expires_in=round(self.expires_at - sent, 2))
                failing = True
                continue
            if new_ttl <= 0:
                return
            if failing:
                log.info("lease keepalive recovered", session=self.name, lease=hex(lease_id))
            failing = False
            self.expires_at = sent + new_ttl

    async def _keepalive_once(self, lease_id: int) -> int:
        call = self.store.client.lease.keep_alive(lease_id)  # type: ignore[union-attr]
        try:
            resp = await call.read()
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise StoreError("keepalive stream closed without an answer")
        return int(resp.TTL)

    async def _revoke_quietly(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError, grpc.aio.AioRpcError, TimeoutError, StoreError):
            await self.store.client.lease.revoke(lease_id, timeout=2.0, max_attempts=1)  # type: ignore[union-attr]
