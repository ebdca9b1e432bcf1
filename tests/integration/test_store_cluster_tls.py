"""The store against a 3-member etcd cluster (failover) and against etcd with TLS and mTLS."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.etcdproc import EtcdCluster, EtcdProcess, TlsFiles
from controlplane.store import EtcdConfig, EtcdStore, LeaseSession, Resync, StoreError, watch_prefix


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    c = EtcdCluster.in_temp_dir(3).start()
    yield c
    c.stop()


async def test_operations_and_leases_survive_losing_a_member(cluster: EtcdCluster, etcd_prefix: str) -> None:
    # When the killed member is the leader, etcd holds a write proposed through a follower until
    # its own request timeout (5 s + 2 x election timeout = 7 s by default) while it elects another:
    # the client's deadline must outlast that, or the test is flaky by construction.
    store = await EtcdStore(EtcdConfig(endpoints=cluster.endpoints, prefix=etcd_prefix, timeout_s=10.0)).connect()
    key = store.key("node")

    async def register(lease_id: int) -> None:
        await store.put(key, b"up", lease=lease_id)

    session = LeaseSession(store, ttl=3, on_granted=register, name="failover")
    session.start()
    await session.wait_alive(10)
    first_lease = session.lease_id
    seen: dict[str, bytes] = {}

    async def watch() -> None:
        # A consumer that derives state from the watch: it must converge whatever member it talks to.
        async for u in watch_prefix(store, store.key("w", "")):
            if isinstance(u, Resync):
                seen.clear()
                seen.update({k: kv.value for k, kv in u.items.items()})
            else:
                for c in u.changes:
                    if c.kv is None:
                        seen.pop(c.key, None)
                    else:
                        seen[c.key] = c.kv.value

    watcher = asyncio.create_task(watch())
    try:
        for i in range(5):
            await store.put(store.key("w", str(i)), b"x")
        cluster.members[0].kill()
        # Every call must still succeed: the channel fails over to the surviving members.
        for i in range(20):
            await store.put(store.key("w", f"after-{i}"), b"y")
            assert (await store.get(store.key("w", f"after-{i}"))) is not None
        await asyncio.sleep(4)  # longer than the TTL: keepalives must have gone to a live member
        assert session.alive and session.lease_id == first_lease and session.losses == 0
        got = await store.get(key)
        assert got is not None and got.lease == first_lease
        assert len(seen) == 25
    finally:
        watcher.cancel()
        await session.close()
        await store.close()
        cluster.members[0].start()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=modelpool-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)
    return TlsFiles(ca_cert=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key", client_auth=True)


async def test_mtls_connects_with_a_client_certificate_and_fails_without(tls_files: TlsFiles, etcd_prefix: str) -> None:
    etcd = EtcdProcess.in_temp_dir(tls=tls_files).start()
    pki = tls_files.ca_cert.parent
    try:
        good = EtcdConfig(endpoints=(f"https://{etcd.endpoint}",), prefix=etcd_prefix, ca_cert=tls_files.ca_cert,
                          client_cert=pki / "client.pem", client_key=pki / "client.key", timeout_s=5.0)
        async with EtcdStore(good) as store:
            await store.put(store.key("tls"), b"secure")
            got = await store.get(store.key("tls"))
            assert got is not None and got.value == b"secure"
        no_client_cert = EtcdConfig(endpoints=(f"https://{etcd.endpoint}",), prefix=etcd_prefix,
                                    ca_cert=tls_files.ca_cert, timeout_s=2.0)
        async with EtcdStore(no_client_cert) as store:
            with pytest.raises(StoreError):
                await store.get(store.key("tls"))
    finally:
        etcd.stop()
