"""WatchedCache against a real etcd: typed deltas, bad records, compaction, restart and a hung etcd."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.loops import LoopState, Supervisor
from controlplane.pb import NodeControl
from controlplane.store import EtcdConfig, EtcdStore, KeyValue
from controlplane.store.cache import CacheEvent, Delta, Replaced, WatchedCache, proto_decoder


def control(reason: str) -> bytes:
    return NodeControl(drain=True, reason=reason).SerializeToString()


async def etcd_contents(store: EtcdStore, prefix: str) -> dict[str, str]:
    kvs, _ = await store.list_prefix(prefix)
    out = {}
    for kv in kvs:
        msg = NodeControl()
        msg.ParseFromString(kv.value)
        out[kv.key] = msg.reason
    return out


def reasons(cache: WatchedCache[NodeControl]) -> dict[str, str]:
    return {k: v.reason for k, v in cache.items.items()}


async def until(check, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with Supervisor() as s:
        yield s


async def test_lists_then_sends_typed_deltas_and_skips_a_bad_record(store: EtcdStore, sup: Supervisor) -> None:
    prefix = store.key("ctl", "")
    await store.put(prefix + "a", control("one"))
    await store.put(prefix + "junk", b"\xff\xff\xff")          # not a NodeControl
    events: list[CacheEvent[NodeControl]] = []
    cache = WatchedCache(store, prefix, proto_decoder(NodeControl), name="ctl", handlers=(events.append,))
    cache.start(sup)
    assert await cache.wait_loaded(5)
    first = events[0]
    assert isinstance(first, Replaced) and {k: v.reason for k, v in first.items.items()} == {prefix + "a": "one"}
    assert first.bad == {prefix + "junk"} and cache.bad_records_total == 1
    await store.put(prefix + "b", control("two"))
    await store.delete(prefix + "a")
    await store.put(prefix + "junk", control("fixed"))
    await until(lambda: reasons(cache) == {prefix + "b": "two", prefix + "junk": "fixed"}, what="deltas applied")
    deltas = [e for e in events[1:] if isinstance(e, Delta)]   # etcd may batch the three events
    assert set().union(*(d.upserts for d in deltas)) == {prefix + "b", prefix + "junk"}
    assert set().union(*(d.deletes for d in deltas)) == {prefix + "a"}
    assert cache.bad_keys == frozenset()
    await store.put(prefix + "b", b"\x08\x08\xff")              # a record turned bad: out, and said so
    await until(lambda: prefix + "b" not in cache.items, what="bad update dropped")
    last = events[-1]
    assert isinstance(last, Delta) and last.bad == {prefix + "b"} and not last.upserts
    assert cache.loop is not None and cache.loop.state is LoopState.OK


class CompactingStore(EtcdStore):
    """Compacts history right after the cache's first list: its watch from R+1 starts compacted."""

    compact_once = True

    async def list_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        out = await super().list_prefix(prefix, revision=revision)
        if self.compact_once:
            self.compact_once = False
            for i in range(3):
                await self.put(prefix + f"late-{i}", control(f"late {i}"))
            await self.delete(prefix + "a")
            await self.compact(await self.revision())
        return out


async def test_compaction_before_the_watch_forces_a_relist_and_the_cache_ends_equal_to_etcd(
        etcd_config: EtcdConfig, store: EtcdStore, sup: Supervisor) -> None:
    prefix = store.key("ctl", "")
    await store.put(prefix + "a", control("one"))
    compacting = await CompactingStore(etcd_config).connect()
    try:
        cache = WatchedCache(compacting, prefix, proto_decoder(NodeControl), name="ctl-compact")
        cache.start(sup)
        await until(lambda: cache.lists >= 2, what="a second list after the compaction")
        want = await etcd_contents(store, prefix)
        await until(lambda: reasons(cache) == want, what="cache equal to etcd")
        assert prefix + "a" not in cache.items and len(want) == 3
        assert cache.loop is not None and cache.loop.status().failures_total >= 1
        assert "compacted" in cache.loop.status().last_error
    finally:
        await compacting.close()


async def test_survives_an_etcd_restart_and_catches_up(etcd_prefix: str, sup: Supervisor) -> None:
    etcd = EtcdProcess.in_temp_dir().start()
    try:
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=etcd_prefix, timeout_s=1.0)).connect()
        prefix = store.key("ctl", "")
        await store.put(prefix + "a", control("one"))
        cache = WatchedCache(store, prefix, proto_decoder(NodeControl), name="ctl-restart", progress_every_s=0.5)
        loop = cache.start(sup)
        assert await cache.wait_loaded(5)
        etcd.kill()
        await until(lambda: loop.state in (LoopState.FAILING, LoopState.STUCK), what="loop failing")
        assert reasons(cache) == {prefix + "a": "one"}       # fail static: the last contents stay
        etcd.start()
        await store.put(prefix + "b", control("two"))
        await store.delete(prefix + "a")
        await until(lambda: reasons(cache) == {prefix + "b": "two"}, what="caught up after the restart")
        await until(lambda: loop.state is LoopState.OK, what="loop OK again")
        await store.close()
    finally:
        etcd.stop()


async def test_a_hung_etcd_makes_the_watch_stuck_and_it_recovers_on_resume(etcd_prefix: str,
                                                                           sup: Supervisor) -> None:
    etcd = EtcdProcess.in_temp_dir().start()
    assert etcd.proc is not None
    try:
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=etcd_prefix, timeout_s=1.0)).connect()
        prefix = store.key("ctl", "")
        cache = WatchedCache(store, prefix, proto_decoder(NodeControl), name="ctl-hung", progress_every_s=0.3,
                             stall_s=1.0)
        loop = cache.start(sup)
        assert await cache.wait_loaded(5)
        await asyncio.sleep(1.2)                 # idle but answering progress requests: still OK
        assert loop.state is LoopState.OK
        etcd.proc.send_signal(signal.SIGSTOP)
        t0 = asyncio.get_running_loop().time()
        await until(lambda: loop.state is not LoopState.OK, timeout=5, what="hung etcd noticed")
        noticed = asyncio.get_running_loop().time() - t0
        assert noticed < 4.0, noticed             # stall bound 1 s, plus a loaded machine
        etcd.proc.send_signal(signal.SIGCONT)
        await store.put(prefix + "x", control("after"))
        await until(lambda: reasons(cache) == {prefix + "x": "after"}, what="caught up after SIGCONT")
        await until(lambda: loop.state is LoopState.OK, what="OK again")
        await store.close()
    finally:
        if etcd.proc is not None:
            etcd.proc.send_signal(signal.SIGCONT)
        etcd.stop()
