"""Shared fixtures: a real etcd process (session-wide) and a fresh key prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.store import EtcdConfig, EtcdStore


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdProcess]:
    """One real etcd for the whole run, on free loopback ports, data in a temp dir."""
    proc = EtcdProcess.in_temp_dir().start()
    yield proc
    proc.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests share one etcd without interfering."""
    return f"/mp-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def etcd_config(etcd_server: EtcdProcess, etcd_prefix: str) -> EtcdConfig:
    return EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix, timeout_s=3.0)


@pytest.fixture
async def store(etcd_config: EtcdConfig) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore(etcd_config).connect()
    yield s
    await s.close()
