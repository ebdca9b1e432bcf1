"""LeaseSession.close revokes a lease whose registration is still in progress (not alive yet)."""

from __future__ import annotations

import asyncio

from controlplane.store import EtcdStore, LeaseSession


async def test_close_during_registration_revokes_the_granted_lease(store: EtcdStore) -> None:
    key = store.prefix + "/registered-on-a-lease"
    registering = asyncio.Event()

    async def on_granted(lease_id: int) -> None:
        await store.put(key, b"x", lease=lease_id)   # a key already on the lease…
        registering.set()
        await asyncio.Event().wait()                 # …and the rest of the registration still running

    session = LeaseSession(store, 30, on_granted=on_granted, name="test")
    session.start()
    await asyncio.wait_for(registering.wait(), 10)
    assert not session.alive
    await session.close()
    # without the revoke the key would stay for the lease's 30 s TTL
    assert await store.get(key) is None
