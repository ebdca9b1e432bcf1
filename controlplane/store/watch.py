"""List-then-watch of a key prefix, with resync (client-go's reflector, for etcd).

``list_then_watch`` is one cycle: it lists the prefix at revision R, yields a ``Resync``, watches
from R+1 and yields ``Changes`` (and, when asked for, ``Progress`` marks) until the stream breaks,
which it reports by raising StoreError. ``controlplane/store/cache.py`` (the typed, supervised
cache every consumer uses) runs that cycle under the loop runner. ``watch_prefix`` is the same
cycle repeated forever with its own backoff, for simple scripts.

``watch_prefix`` yields a ``Resync`` (the full contents of the prefix at revision R) and then
``Changes`` batches from R+1 on. Whenever the watch stream breaks (etcd restarted, network
blip, member failover) or the server says our start revision was compacted away, it lists
again and yields a fresh ``Resync``: consumers rebuild their derived state from it instead of
trusting that nothing was missed. Consumers therefore only need two code paths: replace all,
or apply a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
from etcd3aio import EtcdError, prefix_range_end
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from controlplane.store.client import EtcdStore, KeyValue, _kv
from controlplane.store.errors import StoreAuthError, StoreError

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


@dataclass(frozen=True, slots=True)
class Progress:
    """The watch is alive and everything up to ``revision`` was delivered (no events)."""

    revision: int


WatchUpdate = Resync | Changes
ConnectivityHook = Callable[[bool], None]


async def list_then_watch(store: EtcdStore, prefix: str, *,
                          progress_every_s: float | None = None) -> AsyncIterator[Resync | Changes | Progress]:
    """One list-then-watch cycle: a Resync at R, then Changes from R+1 until the stream breaks.

    Raises StoreError when the list fails or the stream breaks or was compacted: the caller
    relists (after a backoff). With ``progress_every_s``, a progress request goes up the stream
    that often and etcd's answers are yielded as ``Progress``: a silent stream then means a dead
    one, not an idle prefix.
    """
    if not prefix.endswith("/"):
        prefix += "/"
    kvs, revision = await store.list_prefix(prefix)
    yield Resync({kv.key: kv for kv in kvs}, revision)
    try:
        async for update in _watch_from(store, prefix, revision + 1, progress_every_s=progress_every_s):
            yield update
    except (EtcdError, grpc.aio.AioRpcError) as exc:
        raise StoreError(f"watch of {prefix} broke: {_describe(exc)}") from exc


async def watch_prefix(
    store: EtcdStore,
    prefix: str,
    *,
    on_connectivity: ConnectivityHook | None = None,
    max_backoff: float = 2.0,
) -> AsyncIterator[WatchUpdate]:
    """Yield a Resync, then Changes, forever; resync after any break. Never raises StoreError."""
    backoff = 0.05
    while True:
        try:
            async for update in list_then_watch(store, prefix):
                if isinstance(update, Resync):
                    if on_connectivity:
                        on_connectivity(True)
                else:
                    backoff = 0.05
                yield update  # type: ignore[misc]  # no Progress without progress_every_s
        except StoreError as exc:
            if on_connectivity:
                on_connectivity(False)
            log.warning("watch broke; will relist", prefix=prefix, error=str(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


class _Compacted(StoreError):
    pass


async def _watch_from(store: EtcdStore, prefix: str, start_revision: int, *,
                      progress_every_s: float | None = None) -> AsyncIterator[Changes | Progress]:
    """One watch stream; ends (by raising) when it breaks, so the caller relists.

    Progress answers are yielded only when ``progress_every_s`` asked for them."""
    client = store.client
    channel = client._channel  # our one module that knows etcd3aio's insides
    metadata = client.watch._metadata or None  # type: ignore[union-attr]
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[WatchRequest]:
        yield WatchRequest(create_request=WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision,
            progress_notify=True,
        ))
        while progress_every_s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), progress_every_s)
            if stop.is_set():
                return
            ask = WatchRequest()
            ask.progress_request.SetInParent()
            yield ask
        await stop.wait()

    stream = WatchStub(channel).Watch(requests(), metadata=metadata)
    try:
        async for resp in stream:
            if resp.compact_revision > 0:
                raise _Compacted(f"revision {start_revision} compacted (now {resp.compact_revision})")
            if resp.canceled:
                reason = resp.cancel_reason or "no reason given"
                # etcd checks a watch's permission (and token) only when it is created; a refusal
                # is an auth error: the owner relists, and the list renews a stale token.
                error = StoreAuthError if "permission denied" in reason or "auth" in reason else StoreError
                raise error(f"watch of {prefix} canceled by etcd: {reason}")
            if not resp.events:
                if progress_every_s is not None:
                    yield Progress(int(resp.header.revision))
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
