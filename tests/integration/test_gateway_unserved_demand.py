"""Demand the pool cannot serve yet reaches etcd: the harvester's input (issue 16, item 2).

A catalog model with no instance at all is answered 503 with ``Retry-After`` (not 404), and the
request still counts in the demand the gateway publishes in its ``gateways/<gateway_id>`` record.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from controlplane.accounting.demand import demand_of
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import Demand, GatewayRecord, ModelAccess, ModelSpec
from controlplane.store import EtcdConfig, EtcdStore
from gateway.app import GatewayConfig
from gateway.fleet import FleetSettings
from tests.cluster import eventually, gateway_in_process

FAST = FleetSettings(lease_ttl_s=4, publish_interval_s=0.2, usage_flush_s=0.2)


@pytest.fixture
async def store(etcd_server: EtcdProcess) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=f"/mp-unserved-{uuid.uuid4().hex[:8]}"))\
        .connect()
    yield s
    await s.close()


async def test_a_catalog_model_without_instances_is_503_with_retry_after_and_counts_as_demand(
        store: EtcdStore) -> None:
    keys = Keys(store.prefix)
    spec = ModelSpec(name="org/waiting-model", engine="sim", access=ModelAccess(public=True))
    await store.put(keys.model(spec.name), spec.SerializeToString())
    async with gateway_in_process(GatewayConfig(etcd=store.config, auth=False, fleet=FAST)) as (gw, url):
        await eventually(lambda: _true(gw.access.in_catalog(spec.name)), what="catalog loaded")
        body = {"model": spec.name, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                    error = (await r.json())["error"]
                    assert r.status == 503 and error["code"] == "no_capacity", error
                    assert int(r.headers["Retry-After"]) >= 1
            async with http.post(f"{url}/v1/chat/completions", json={**body, "model": "not-in-catalog"}) as r:
                assert r.status == 404  # unknown models are not demand

        async def published() -> dict[str, Demand]:
            kv = await store.get(keys.gateway(gw.config.gateway_id))
            return {d.model: d for d in demand_of([decode(GatewayRecord, kv)], [])} if kv is not None else {}

        async def demand() -> Demand | None:
            return (await published()).get(spec.name)

        d = await eventually(demand, what="demand of the unserved model in the gateway record")
        assert d.requests_per_second > 0
        assert "not-in-catalog" not in await published()


async def _true(value: bool) -> bool:
    return value
