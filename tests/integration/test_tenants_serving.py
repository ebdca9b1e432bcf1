"""Who may serve a model, with etcd auth on: hijacks through an agent or raw writes are refused, a
deleted tenant leaves routing at once, and the planner places restricted models only on their
tenants' nodes (an etcd of their own: tests/authpool.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controlplane.pb import InstanceRecord, InstanceState, ModelSpec
from controlplane.procs import spawn
from controlplane.store import EtcdStore, StoreAuthError
from gateway.app import GatewayConfig
from gateway.fleet import FleetSettings
from tests.authpool import AuthPool, auth_pool, connected, denied, instance
from tests.cluster import CTL, eventually, gateway_in_process, start_agent, start_gateway, stop_all


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthPool]:
    yield from auth_pool(tmp_path_factory)


# -- who may serve ---------------------------------------------------------------------------------


async def sim_requests(http: aiohttp.ClientSession, url: str) -> float:
    """Finished requests an engine counted (the sim engine's vLLM-style counter)."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


@contextlib.asynccontextmanager
async def trap() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server that records every request: the engine a hijacker would point at."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"choices": [{"message": {"content": "stolen"}}]})

    server = web.Application()
    server.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def test_a_second_tenant_cannot_hijack_a_model_the_first_alone_may_serve(pool: AuthPool, tmp_path: Path) -> None:
    k = pool.keys
    async with connected(pool.config("ops")) as ops:
        await ops.put(k.model("secret"), ModelSpec(name="secret", engine="sim", servers=["alpha"]).SerializeToString())
        await ops.put(k.model("open"), ModelSpec(name="open", engine="sim").SerializeToString())
    endpoint, procs = pool.etcd.endpoint, []
    try:
        alpha_pw = str(pool.password_file("tenant-alpha"))
        procs.append(start_agent(endpoint, pool.prefix, tmp_path, "secret", "a1", "--etcd-user", "tenant-alpha",
                                 "--etcd-password-file", alpha_pw, "--lease-ttl", "4")[0])
        # beta's agent: the same model (a hijack through its agent) and a community model
        beta_agent, beta_log = start_agent(
            endpoint, pool.prefix, tmp_path, "secret@1", "b1", "--serve", "open@1", "--gpus", "2xSIM-24GB",
            "--etcd-user", "tenant-beta", "--etcd-password-file", str(pool.password_file("tenant-beta")),
            "--lease-ttl", "4")
        procs.append(beta_agent)
        config = GatewayConfig(etcd=pool.config("gw"), auth=False, fleet=FleetSettings(lease_ttl_s=4))
        async with trap() as (trap_url, hits), gateway_in_process(config) as (gw, url), \
                connected(pool.config("tenant-beta")) as beta, aiohttp.ClientSession() as http:
            # raw writes with beta's credentials: its own key is stored (and refused by gateways),
            # alpha's keys, the old layout and the catalog are refused by etcd
            await beta.put(k.for_tenant("beta").instance("secret", "evil"), instance("secret", "evil", trap_url))
            for key in (k.for_tenant("alpha").instance("secret", "evil"), k.instance("secret", "evil")):
                with pytest.raises(StoreAuthError, match="permission denied"):
                    await beta.put(key, instance("secret", "evil", trap_url))
            with pytest.raises(StoreAuthError, match="permission denied"):
                await beta.put(k.model("secret"), ModelSpec(name="secret", servers=["beta"]).SerializeToString())

            async def settled() -> bool:
                refused = {ep.instance_id.split("/")[0] for ep, _ in gw.table.refused().values()}
                return (len(gw.table.ready("secret")) == 1 and len(gw.table.ready("open")) == 1
                        and len(gw.table.refused()) == 2 and refused == {"beta"})
            await eventually(settled, timeout=40, interval=0.1, what="alpha's secret and beta's open routed")
            (alpha_ep,) = gw.table.ready("secret")
            assert alpha_ep.tenant == "alpha" and alpha_ep.instance_id.startswith("alpha/")
            beta_secret = next(ep for ep, _ in gw.table.refused().values() if ep.url != trap_url)

            for _ in range(12):
                async with http.post(url + "/v1/chat/completions", json={
                        "model": "secret", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
                    assert r.status == 200, await r.text()
                async with http.post(url + "/v1/completions", json={"model": "open", "prompt": "x",
                                                                    "max_tokens": 2}) as r:
                    assert r.status == 200, await r.text()
            assert hits == [], "the hijacker's endpoint received a request"
            assert await sim_requests(http, beta_secret.url) == 0
            assert await sim_requests(http, alpha_ep.url) >= 12

            async with http.get(url + "/v1/models") as r:
                cards = {m["id"]: m for m in (await r.json())["data"]}
            assert cards["secret"]["community_served"] is False and cards["secret"]["served_by"] == ["alpha"]
            assert cards["open"]["community_served"] is True and cards["open"]["served_by"] == ["beta"]
            async with http.get(url + "/readyz") as r:
                assert (await r.json())["refused_instances"] == 2

            # `ctl status` (an operator's credentials) shows the refusals and why
            code, out, err = await asyncio.to_thread(pool.ctl, "status", "-o", "json", user="ops")
            assert code == 0, err
            refused = {(i["tenant"], i["instance_id"]): i["refused"] for i in json.loads(out)["instances"]
                       if i["refused"]}
            assert set(refused) == {("beta", "evil"), ("beta", beta_secret.instance_id.split("/", 1)[1])}
            assert all("tenant 'beta' may not serve model 'secret' (servers: alpha)" in why for why in refused.values())
            code, out, _ = await asyncio.to_thread(pool.ctl, "status", user="ops")
            assert "refused: instance evil of tenant beta" in out

            # the agent says it is refused, once
            async def agent_warned() -> bool:
                return "gateways will not route to this instance" in beta_log.read_text()
            await eventually(agent_warned, timeout=15, what="beta's agent warns")
            assert beta_log.read_text().count("gateways will not route to this instance") == 1

            # the operator lets beta serve it too: routed from then on
            async with connected(pool.config("ops")) as ops:
                await ops.put(k.model("secret"), ModelSpec(name="secret", engine="sim",
                                                           servers=["alpha", "beta"]).SerializeToString())
                await eventually(lambda: asyncio.sleep(0, len(gw.table.ready("secret")) == 3), timeout=10,
                                 what="beta's instances routed once allowed")
                await ops.delete(k.model("secret"))
                await ops.delete(k.model("open"))
            await beta.delete(k.for_tenant("beta").instance("secret", "evil"))
    finally:
        stop_all(procs)


async def test_deleting_a_tenant_removes_its_instances_from_routing(pool: AuthPool, tmp_path: Path) -> None:
    endpoint = pool.etcd.endpoint
    gw, url = start_gateway(endpoint, pool.prefix, tmp_path, "--no-auth", "--etcd-user", "gw",
                            "--etcd-password-file", str(pool.password_file("gw")), "--lease-ttl", "4")
    agent, _ = start_agent(endpoint, pool.prefix, tmp_path, "gamma-model", "g1", "--lease-ttl", "30",
                             "--etcd-user", "tenant-gamma",
                             "--etcd-password-file", str(pool.password_file("tenant-gamma")))
    try:
        async with aiohttp.ClientSession() as http:
            async def routed() -> int:
                async with http.get(url + "/v1/models/gamma-model") as r:
                    return int((await r.json())["instances"]) if r.status == 200 else 0
            await eventually(routed, timeout=30, interval=0.1, what="gamma's instance routed")
            started = time.monotonic()
            report = await asyncio.to_thread(pool.ctl_json, "tenants", "delete", "gamma")
            assert report["user_deleted"] and report["role_deleted"] and report["leases_revoked"] == 1
            assert report["records_deleted"] == 2  # its node and its instance

            async def unrouted() -> bool:
                return await routed() == 0
            await eventually(unrouted, timeout=10, interval=0.05, what="gamma's instance out of routing")
            gone_s = time.monotonic() - started
            print(f"\ntenant delete -> instance out of the gateway's routing: {gone_s:.2f}s (lease TTL 30 s)")
            assert gone_s < 30
            # its agent can no longer write anything, and does not come back
            await asyncio.sleep(3)
            assert await routed() == 0
            listed = {t["tenant"] for t in await asyncio.to_thread(pool.ctl_json, "tenants", "list")}
            assert "gamma" not in listed
            with pytest.raises(StoreAuthError, match="authentication failed"):
                await EtcdStore(pool.config("tenant-gamma")).connect()
    finally:
        stop_all([agent, gw])


async def test_the_planner_places_on_tenant_nodes_with_its_own_credentials(pool: AuthPool, tmp_path: Path) -> None:
    """`ctl apply` as the planner role: a restricted model goes to the allowed tenant's pool node
    (desired/<tenant>%2F<node>/, which only that tenant reads), never to the other's."""
    k = pool.keys
    cluster = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
    procs = []
    async with connected(pool.config("ops")) as ops:
        await ops.put(k.model("placed"), ModelSpec(name="placed", engine="sim", weight_memory_bytes=8 << 30,
                                                   min_replicas=1, servers=["beta"]).SerializeToString())
    try:
        for tenant in ("alpha", "beta"):
            # the same node id for both: node refs keep their desired state apart
            procs.append(spawn([*CTL, "agent", "--pool", "--engine", "sim", "--gpus", "1xA100-80GB", "--node-id",
                                "pool-n", "--etcd", pool.etcd.endpoint, "--etcd-prefix", pool.prefix,
                                "--log-dir", str(tmp_path / f"engines-{tenant}"), "--etcd-user", f"tenant-{tenant}",
                                "--etcd-password-file", str(pool.password_file(f"tenant-{tenant}"))],
                               tmp_path / f"agent-{tenant}.log"))
        async with connected(pool.config("planner-1")) as planner:
            async def both_nodes() -> bool:
                nodes, _ = await planner.list_prefix(k.tenants)
                return sum("/nodes/" in kv.key for kv in nodes) == 2
            await eventually(both_nodes, timeout=30, what="both pool agents registered")
            code, out, err = await asyncio.to_thread(pool.ctl, "apply", "--auto-approve", "--cluster", str(cluster),
                                                     "-o", "json", user="planner-1")
            assert code == 0, (out, err)
            desired, _ = await planner.list_prefix(k.desired)
            assert [kv.key.split("/")[3] for kv in desired] == ["beta%2Fpool-n"], [kv.key for kv in desired]

            async def beta_ready() -> bool:
                kvs, _ = await planner.list_prefix(k.tenant("beta") + "instances/")
                return any(InstanceRecord.FromString(kv.value).state == InstanceState.READY for kv in kvs)
            await eventually(beta_ready, timeout=40, interval=0.2, what="beta's node runs the placed model")
            kvs, _ = await planner.list_prefix(k.tenant("alpha") + "instances/")
            assert kvs == [], "alpha's node of the same id got nothing"
            # the planner's credentials cannot write what is not its own
            await denied(planner, k.model("placed"))
    finally:
        stop_all(procs)
        async with connected(pool.config("ops")) as ops:
            await ops.delete(k.model("placed"))
            await ops.delete(k.desired, prefix=True)
            await ops.delete(k.current_plan)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELPOOL_ETCD_USER", "MODELPOOL_ETCD_PASSWORD", "MODELPOOL_ETCD_PASSWORD_FILE",
                 "MODELPOOL_TENANT"):
        monkeypatch.delenv(name, raising=False)
    assert "MODELPOOL_ETCD_PASSWORD" not in os.environ
