"""EtcdStore, LeaseSession and watch_prefix against a real etcd process."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.store import (
    Changes,
    Cmp,
    EtcdConfig,
    EtcdStore,
    LeaseSession,
    Op,
    Resync,
    StoreUnavailable,
    TxnConflict,
    watch_prefix,
)


async def test_put_get_list_delete_with_revisions(store: EtcdStore) -> None:
    k1, k2 = store.key("a", "1"), store.key("a", "2")
    r1 = await store.put(k1, b"one")
    r2 = await store.put(k2, b"two")
    assert r2 > r1
    got = await store.get(k1)
    assert got is not None and got.value == b"one" and got.mod_revision == r1
    items, rev = await store.list_prefix(store.key("a", ""))
    assert [kv.key for kv in items] == [k1, k2]
    assert rev >= r2
    assert await store.delete(store.key("a", ""), prefix=True) == 2
    assert await store.get(k1) is None


async def test_guarded_transaction_rejects_a_stale_read(store: EtcdStore) -> None:
    k = store.key("plan")
    rev = await store.put(k, b"v1")
    await store.guarded_txn([Cmp.mod_revision(k, rev)], [Op.put(k, b"v2")], "first apply")
    with pytest.raises(TxnConflict, match="second apply"):
        await store.guarded_txn([Cmp.mod_revision(k, rev)], [Op.put(k, b"v3")], "second apply")
    got = await store.get(k)
    assert got is not None and got.value == b"v2"
    # A prefix-wide guard: nothing under the prefix changed after `rev2`.
    rev2 = await store.revision()
    await store.put(store.key("x", "1"), b"1")
    ok, _ = await store.txn([Cmp.mod_revision(store.key("x", ""), rev2 + 1, "<", prefix=True)], [])
    assert not ok


async def test_watch_lists_then_streams_then_resyncs_after_compaction(store: EtcdStore) -> None:
    prefix = store.key("w", "")
    await store.put(prefix + "a", b"1")
    updates: asyncio.Queue[object] = asyncio.Queue()

    async def consume() -> None:
        async for u in watch_prefix(store, prefix):
            await updates.put(u)

    task = asyncio.create_task(consume())
    try:
        first = await asyncio.wait_for(updates.get(), 5)
        assert isinstance(first, Resync) and list(first.items) == [prefix + "a"]
        await store.put(prefix + "b", b"2")
        await store.delete(prefix + "a")
        seen: list[tuple[str, bool]] = []
        while len(seen) < 2:
            batch = await asyncio.wait_for(updates.get(), 5)
            assert isinstance(batch, Changes)
            seen.extend((c.key, c.kv is None) for c in batch.changes)
        assert seen == [(prefix + "b", False), (prefix + "a", True)]
    finally:
        task.cancel()

    # A watcher that resumes from a compacted revision must relist, not skip ahead.
    stale_rev = await store.put(prefix + "c", b"3")
    for i in range(3):
        await store.put(prefix + "c", str(i).encode())
    await store.compact(await store.revision())
    from controlplane.store import watch as watch_mod

    with pytest.raises(watch_mod._Compacted):
        async for _ in watch_mod._watch_from(store, prefix, stale_rev):
            pass


async def test_lease_session_keeps_alive_and_revoke_deletes_keys(store: EtcdStore) -> None:
    key = store.key("leased")

    async def register(lease_id: int) -> None:
        await store.put(key, b"here", lease=lease_id)

    session = LeaseSession(store, ttl=2, on_granted=register, name="t")
    session.start()
    await session.wait_alive(5)
    await asyncio.sleep(3.0)  # longer than the TTL: only keepalives keep the key
    assert (await store.get(key)) is not None
    await session.close()
    assert (await store.get(key)) is None


async def test_lease_session_survives_an_etcd_restart_and_reregisters(etcd_prefix: str) -> None:
    etcd = EtcdProcess.in_temp_dir().start()
    try:
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=etcd_prefix, timeout_s=1.0)).connect()
        key = store.key("node")

        async def register(lease_id: int) -> None:
            await store.put(key, b"n", lease=lease_id)

        session = LeaseSession(store, ttl=2, on_granted=register, name="restart")
        session.start()
        first = await session.wait_alive(5)
        etcd.kill()
        with pytest.raises(StoreUnavailable):
            await store.get(key)
        await asyncio.sleep(3.5)  # past the TTL while etcd is down: the lease is lost
        assert not session.alive
        etcd.start()
        second = await session.wait_alive(15)
        assert session.grants >= 2 and session.losses >= 1
        got = await store.get(key)
        assert got is not None and got.lease == second
        del first
        await session.close()
        await store.close()
    finally:
        etcd.stop()
