"""A researcher's serve job on a real Slurm: routable, then drained under load with zero failures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import start_agent, start_gateway, stop_all
from tests.slurm.lifecycle import MODEL, run_lifecycle

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pool(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A gateway and a backup agent for MODEL outside Slurm, so the pool keeps serving during a drain."""
    tmp = tmp_path_factory.mktemp("slurm-pool")
    prefix = f"/mp-slurm-{uuid.uuid4().hex[:6]}"
    gw, url = start_gateway(etcd_server.endpoint, prefix, tmp, "--no-auth")
    backup, _ = start_agent(etcd_server.endpoint, prefix, tmp, MODEL, "backup", "--sim-option", "tokens_per_s=200")
    yield {"prefix": prefix, "gateway": url, "tmp": str(tmp)}
    stop_all([backup, gw])


@pytest.fixture
async def pool_store(pool: dict[str, str], etcd_server: EtcdProcess) -> AsyncIterator[EtcdStore]:
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=pool["prefix"])).connect()
    yield store
    await store.close()


@pytest.mark.parametrize("end_by", ["scancel", "timelimit"])
async def test_serve_job_drains_without_failed_requests(slurm_cluster, pool, pool_store, etcd_server,  # type: ignore[no-untyped-def]
                                                       end_by: str) -> None:
    result = await run_lifecycle(slurm_cluster, pool_store, pool["gateway"], etcd_server.endpoint,
                                 Path(pool["tmp"]), end_by=end_by)
    print(f"\nslurm {end_by}: {result}")
    assert result.requests_failed == 0, result.errors
    assert result.requests_ok > 20
    assert result.requests_to_slurm_instance > 0, "the Slurm job's instance never served: the test proves nothing"
    assert result.end_signal_to_records_gone_s < 30
    assert result.job_state in ({"CANCELLED"} if end_by == "scancel" else {"COMPLETED"}), result.job_state
