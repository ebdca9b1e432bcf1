"""List-then-watch of a key prefix, with resync (client-go's reflector, for etcd).

``watch_prefix`` yields a ``Resync`` (the full contents of the prefix at revision R) and then
``Changes`` batches from R+1 on. Whenever the watch stream breaks (etcd restarted, network
blip, member failover) or the server says our start revision was compacted away, it lists
again and yields a fresh ``Resync``: consumers rebuild their derived state from it instead of
trusting that nothing was missed. Consumers therefore only need two code paths: replace all,
or apply a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
from etcd3aio import EtcdError, prefix_range_end
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from controlplane.store.client import EtcdStore, KeyValue, _kv
from controlplane.store.errors import StoreError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Resync:
    """The whole prefix as of ``revision``: replace everything derived from it."""

    items: dict[str, KeyValue]
    revision: int


@dataclass(frozen=True, slots=True)
class Change:
    """One key changed: ``kv`` is the new value, or None when the key was deleted."""

    key: str
    kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class Changes:
    """Changes applied atomically at ``revision`` (one etcd watch response)."""

    changes: tuple[Change, ...]
    revision: int


WatchUpdate = Resync | Changes
ConnectivityHook = Callable[[bool], None]


async def watch_prefix(
    store: EtcdStore,
    prefix: str,
    *,
    on_connectivity: ConnectivityHook | None = None,
    max_backoff: float = 2.0,
) -> AsyncIterator[WatchUpdate]:
    """Yield a Resync, then Changes, forever; resync after any break. Never raises StoreError."""
    if not prefix.endswith("/"):
        prefix += "/"
    backoff = 0.05
    while True:
        try:
            kvs, revision = await store.list_prefix(prefix)
        except StoreError as exc:
            if on_connectivity:
                on_connectivity(False)
            log.warning("list failed; retrying", prefix=prefix, error=str(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        if on_connectivity:
            on_connectivity(True)
        yield Resync({kv.key: kv for kv in kvs}, revision)
        try:
            async for batch in _watch_from(store, prefix, revision + 1):
                backoff = 0.05
                yield batch
        except (EtcdError, grpc.aio.AioRpcError, StoreError) as exc:
            if on_connectivity:
                on_connectivity(False)
            log.warning("watch broke; will relist", prefix=prefix, error=_describe(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


class _Compacted(StoreError):
    pass


async def _watch_from(store: EtcdStore, prefix: str, start_revision: int) -> AsyncIterator[Changes]:
    """One watch stream; ends (by raising) when it breaks, so the caller relists."""
    client = store.client
    channel = client._channel  # our one module that knows etcd3aio's insides
    metadata = client.watch._metadata or None  # type: ignore[union-attr]
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[WatchRequest]:
        yield WatchRequest(create_request=WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision,
            progress_notify=True,
        ))
        await stop.wait()

    stream = WatchStub(channel).Watch(requests(), metadata=metadata)
    try:
        async for resp in stream:
            if resp.compact_revision > 0:
                raise _Compacted(f"revision {start_revision} compacted (now {resp.compact_revision})")
            if resp.canceled:
                raise StoreError(f"watch canceled by etcd: {resp.cancel_reason or 'no reason given'}")
            if not resp.events:
                continue
            changes = tuple(
                Change(ev.kv.key.decode(), None if ev.type == ev.DELETE else _kv(ev.kv)) for ev in resp.events
            )
            yield Changes(changes, int(resp.header.revision))
        raise StoreError("watch stream ended")
    finally:
        stop.set()
        stream.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
