"""WatchedCache: a typed, decoded copy of one etcd prefix, kept current (client-go's informer).

Every component that follows etcd state (the gateway's routing, key and model tables, the fleet
size, an agent's desired assignments, catalog and drain control) holds one of these per prefix,
run under the loop runner (``controlplane/loops.py``). Nobody writes an ``apply()`` of watch
batches any more: a cache decodes, and handlers get typed deltas.

    list at R ──decode each record──▶ Replaced(items, bad, R) ──▶ handlers
        │                                  (one bad record: logged, counted, left out)
    watch from R+1 ──▶ Delta(upserts, deletes, bad, rev) ──▶ handlers
        │  progress request every progress_every_s ──▶ answers are the loop's progress
        └─ compacted / broken / silent for stall_s / a handler raised ──▶ the step fails
                                 ──▶ loop runner: backoff with jitter ──▶ list again

The cache keeps its last contents while etcd is away (fail static) and replaces them when the
next list arrives. ``loaded`` becomes true with the first list and stays true.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog
from google.protobuf.message import DecodeError, Message

from controlplane.loops import Backoff, ContinuousLoop, ProgressFn, Supervisor
from controlplane.store.client import EtcdStore, KeyValue
from controlplane.store.errors import StoreError
from controlplane.store.watch import Changes, Resync, list_then_watch

log = structlog.get_logger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class RecordError(ValueError):
    """A stored value is not what its prefix promises; the cache leaves the record out."""


@dataclass(frozen=True, slots=True)
class Replaced(Generic[T]):
    """The whole prefix as of ``revision``: handlers replace everything derived from it.

    ``bad`` names the keys whose values did not decode (left out of ``items``).
    """

    items: Mapping[str, T]
    bad: frozenset[str]
    revision: int


@dataclass(frozen=True, slots=True)
class Delta(Generic[T]):
    """What changed at ``revision`` (one watch response, folded per key: the last event wins).

    ``deletes`` are keys that are gone; ``bad`` are keys whose new value did not decode: they
    left ``items`` too (a handler that fails closed, like private models, treats them apart).
    """

    upserts: Mapping[str, T]
    deletes: frozenset[str]
    bad: frozenset[str]
    revision: int


CacheEvent = Replaced[T] | Delta[T]
Handler = Callable[[CacheEvent[T]], None]


def proto_decoder(message_type: type[M]) -> Callable[[KeyValue], M]:
    """A decoder for a cache of ``message_type`` records (RecordError when one does not parse)."""

    def decode(kv: KeyValue) -> M:
        msg = message_type()
        try:
            msg.ParseFromString(kv.value)
        except DecodeError as exc:
            raise RecordError(f"not a valid {message_type.__name__}: {exc}") from exc
        return msg

    decode.__name__ = f"decode_{message_type.__name__}"
    return decode


def to_event(update: Resync | Changes, decode: Callable[[KeyValue], T], *, name: str = "") -> CacheEvent[T]:
    """Decode one watch update into a typed event (pure: the cache and tests use it alike).

    Changes are folded per key (the last event of a key in the batch wins). A value that does not
    decode is logged and named in ``bad``, never fatal.
    """

    def one(kv: KeyValue) -> T | None:
        try:
            return decode(kv)
        except ValueError as exc:  # RecordError, protobuf's DecodeError, a decoder's own check
            log.warning("skipping bad record", cache=name, key=kv.key, error=str(exc))
            return None

    if isinstance(update, Resync):
        items: dict[str, T] = {}
        bad: set[str] = set()
        for key, kv in update.items.items():
            rec = one(kv)
            if rec is None:
                bad.add(key)
            else:
                items[key] = rec
        return Replaced(items, frozenset(bad), update.revision)
    folded: dict[str, KeyValue | None] = {c.key: c.kv for c in update.changes}
    upserts: dict[str, T] = {}
    deletes: set[str] = set()
    bad = set()
    for key, value in folded.items():
        if value is None:
            deletes.add(key)
            continue
        rec = one(value)
        if rec is None:
            bad.add(key)
        else:
            upserts[key] = rec
    return Delta(upserts, frozenset(deletes), frozenset(bad), update.revision)


class HandlerFailed(StoreError):
    """A handler raised: the cache relists so the handlers' derived state is rebuilt whole."""


class WatchedCache(Generic[T]):
    """The decoded records under ``prefix``, by full key; see the module docstring.

    ``decode`` turns a KeyValue into a record (raise RecordError, or any ValueError, to leave it
    out); ``proto_decoder(MessageType)`` is the usual one. Handlers are called synchronously,
    in order, after the cache itself changed.
    """

    def __init__(self, store: EtcdStore, prefix: str, decode: Callable[[KeyValue], T], *, name: str,
                 handlers: tuple[Handler[T], ...] = (), progress_every_s: float = 5.0,
                 stall_s: float | None = None) -> None:
        self.store = store
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.decode = decode
        self.name = name
        self.progress_every_s = progress_every_s
        # A healthy stream answers every progress request; three missed ones mean it is dead.
        self.stall_s = stall_s if stall_s is not None else 3 * progress_every_s
        self._handlers: list[Handler[T]] = list(handlers)
        self._items: dict[str, T] = {}
        self._bad: set[str] = set()
        self.revision = 0
        self.bad_records_total = 0
        self.lists = 0
        self._loaded = asyncio.Event()
        self.loop: ContinuousLoop | None = None

    # -- reading -----------------------------------------------------------------------------

    @property
    def items(self) -> Mapping[str, T]:
        """Decoded records by full key (read-only view; do not keep it across awaits)."""
        return self._items

    @property
    def bad_keys(self) -> frozenset[str]:
        """Keys whose current value does not decode."""
        return frozenset(self._bad)

    @property
    def loaded(self) -> bool:
        """True once the first list arrived (it stays true while etcd is away)."""
        return self._loaded.is_set()

    async def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for the first list; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def subscribe(self, handler: Handler[T]) -> None:
        """Call ``handler`` on every later event; it gets a Replaced of the current contents first
        when the cache is loaded already."""
        self._handlers.append(handler)
        if self.loaded:
            handler(Replaced(dict(self._items), frozenset(self._bad), self.revision))

    # -- running -----------------------------------------------------------------------------

    def start(self, supervisor: Supervisor, *, backoff: Backoff | None = None) -> ContinuousLoop:
        """Run under ``supervisor`` as the continuous loop ``name``."""
        self.loop = supervisor.continuous(self.name, self.run, stall_s=self.stall_s,
                                          backoff=backoff or Backoff(base_s=0.05, max_s=2.0))
        return self.loop

    async def run(self, progress: ProgressFn) -> None:
        """One list-then-watch cycle; raises (StoreError) when it must relist."""
        async for update in list_then_watch(self.store, self.prefix, progress_every_s=self.progress_every_s):
            if isinstance(update, Resync):
                self._replace(update)
            elif isinstance(update, Changes):
                self._patch(update)
            progress()

    def _replace(self, update: Resync) -> None:
        event = to_event(update, self.decode, name=self.name)
        assert isinstance(event, Replaced)  # a Resync always gives a Replaced
        self.bad_records_total += len(event.bad)
        self._items, self._bad, self.revision = dict(event.items), set(event.bad), event.revision
        self.lists += 1
        first = not self.loaded
        self._loaded.set()
        log.info("cache listed", cache=self.name, records=len(self._items), bad=len(self._bad),
                 revision=event.revision, first=first)
        self._notify(event)

    def _patch(self, update: Changes) -> None:
        event = to_event(update, self.decode, name=self.name)
        assert isinstance(event, Delta)  # Changes always give a Delta
        self.bad_records_total += len(event.bad)
        for key, rec in event.upserts.items():
            self._items[key] = rec
            self._bad.discard(key)
        for key in event.deletes:
            self._items.pop(key, None)
            self._bad.discard(key)
        for key in event.bad:
            self._items.pop(key, None)
            self._bad.add(key)
        self.revision = event.revision
        self._notify(event)

    def _notify(self, event: CacheEvent[T]) -> None:
        for handler in self._handlers:
            try:
                handler(event)
            except Exception as exc:  # a handler's bug: its derived state is suspect, so rebuild it
                log.exception("cache handler failed; relisting", cache=self.name,
                              handler=getattr(handler, "__qualname__", repr(handler)))
                raise HandlerFailed(f"{self.name}: handler {getattr(handler, '__qualname__', handler)} "
                                    f"failed: {exc}") from exc
