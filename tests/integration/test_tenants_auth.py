"""Trust between tenants, against a real etcd with authentication on (docs/security.md).

Auth is global to an etcd, so this module starts its own (the session etcd of conftest.py stays
open). Its tokens expire after 2 s idle (``--auth-token-ttl 2``): every test here also runs
through token expiry. Auth is turned on, tenants and service users made, all through `ctl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from typer.testing import CliRunner

import controlplane.cli.auth
import controlplane.cli.plan
import controlplane.cli.status
import controlplane.cli.tenants  # noqa: F401  (register the commands)
from controlplane.cli.main import app
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.loops import Supervisor
from controlplane.pb import InstanceRecord, InstanceState, ModelSpec, NodeRecord
from controlplane.procs import spawn
from controlplane.roles import ServiceRole, service_role_perms, tenant_perms
from controlplane.store import EtcdConfig, EtcdStore, LeaseSession, Op, StoreAuthError
from controlplane.store.cache import WatchedCache, proto_decoder
from gateway.app import GatewayConfig
from gateway.fleet import FleetSettings
from tests.cluster import CTL, eventually, gateway_in_process, start_agent, start_gateway, stop_all

ROOT_PASSWORD = "root-" + uuid.uuid4().hex
TOKEN_TTL_S = 2


@dataclass
class AuthPool:
    """The auth-enabled etcd of this module and the credentials `ctl` made for it."""

    etcd: EtcdProcess
    prefix: str
    home: Path
    passwords: dict[str, str] = field(default_factory=dict)   # etcd user -> password

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def config(self, user: str | None) -> EtcdConfig:
        password = None if user is None else ROOT_PASSWORD if user == "root" else self.passwords[user]
        return EtcdConfig(endpoints=(self.etcd.endpoint,), prefix=self.prefix, user=user, password=password,
                          timeout_s=3.0)

    def password_file(self, user: str) -> Path:
        path = self.home / f"{user}.pw"
        path.write_text(self.passwords[user] + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    def ctl(self, *args: str, user: str = "root", password: str | None = None) -> tuple[int, str, str]:
        env = {"MODELPOOL_ETCD_USER": user,
               "MODELPOOL_ETCD_PASSWORD": password if password is not None else (
                   ROOT_PASSWORD if user == "root" else self.passwords[user])}
        res = CliRunner().invoke(app, [*args, "--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix], env=env)
        return res.exit_code, res.stdout, res.stderr

    def ctl_json(self, *args: str, user: str = "root") -> Any:
        code, out, err = self.ctl(*args, "-o", "json", user=user)
        assert code == 0, (args, out, err)
        return json.loads(out)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthPool]:
    etcd = EtcdProcess.in_temp_dir(extra_args=("--auth-token-ttl", str(TOKEN_TTL_S), "--bcrypt-cost", "4")).start()
    p = AuthPool(etcd, "/mp-auth", tmp_path_factory.mktemp("auth"))
    try:
        enabled = p.ctl_json("auth", "enable")
        assert enabled["was_enabled"] is False and enabled["root_user"] == "created"
        for tenant in ("alpha", "beta", "gamma"):
            made = p.ctl_json("tenants", "create", tenant)
            assert made["user"] == f"tenant-{tenant}" and len(made["password"]) >= 24
            p.passwords[made["user"]] = made["password"]
        for user, role in (("gw", "gateway"), ("planner-1", "planner"), ("ops", "admin")):
            made = p.ctl_json("auth", "user", "create", user, "--role", role)
            assert made == {"user": user, "role": role, "password": made["password"]}
            p.passwords[user] = made["password"]
        yield p
    finally:
        etcd.stop()


@contextlib.asynccontextmanager
async def connected(config: EtcdConfig) -> AsyncIterator[EtcdStore]:
    store = await EtcdStore(config).connect()
    try:
        yield store
    finally:
        await store.close()


def instance(model: str, iid: str, url: str, node: str = "n1") -> bytes:
    return InstanceRecord(instance_id=iid, model=model, node_id=node, endpoint=url, state=InstanceState.READY,
                          engine="sim").SerializeToString()


async def denied(store: EtcdStore, key: str) -> None:
    with pytest.raises(StoreAuthError, match="permission denied"):
        await store.put(key, b"x")


# -- ctl -------------------------------------------------------------------------------------------


def test_ctl_auth_and_tenants_commands(pool: AuthPool) -> None:
    again = pool.ctl_json("auth", "enable")
    assert again["was_enabled"] is True and again["root_user"] == "existing"
    assert all(c == {"granted": 0, "revoked": 0} for c in again["roles"].values()), again
    assert set(again["roles"]) >= {"admin", "gateway", "planner", "harvester", "tenant-alpha", "tenant-beta"}

    status = pool.ctl_json("auth", "status")
    roles = {r["role"]: r for r in status["roles"]}
    assert status["enabled"] is True and all(roles[r]["up_to_date"] for r in ("gateway", "planner", "tenant-alpha"))
    assert roles["gateway"]["users"] == ["gw"] and roles["tenant-beta"]["users"] == ["tenant-beta"]
    assert roles["tenant-alpha"]["permissions"] == [p.describe(pool.prefix) for p in tenant_perms(pool.keys, "alpha")]
    for role in ServiceRole:
        assert roles[role.value]["permissions"] == [p.describe(pool.prefix)
                                                    for p in service_role_perms(pool.keys, role)]

    listed = {t["tenant"]: t for t in pool.ctl_json("tenants", "list")}
    assert listed["alpha"]["user"] == "tenant-alpha" and listed["alpha"]["role"] == "tenant-alpha"
    users = {u["user"]: u["roles"] for u in pool.ctl_json("auth", "user", "list")}
    assert users["root"] == ["root"] and users["ops"] == ["admin"] and users["tenant-gamma"] == ["tenant-gamma"]

    assert pool.ctl("tenants", "create", "alpha")[0] == 4                       # exists
    assert pool.ctl("auth", "user", "create", "gw", "--role", "gateway")[0] == 4
    for bad in (("tenants", "create", "legacy"), ("tenants", "create", "Alpha"), ("tenants", "delete", "a/b"),
                ("auth", "user", "create", "tenant-x", "--role", "admin"), ("auth", "user", "create", "root",
                                                                             "--role", "admin"),
                ("auth", "user", "create", "u1", "--role", "superuser")):
        assert pool.ctl(*bad)[0] == 2, bad
    assert pool.ctl("tenants", "delete", "nosuch")[0] == 3
    assert pool.ctl("auth", "user", "delete", "nosuch")[0] == 3
    code, _, err = pool.ctl("auth", "enable", password="")
    assert code == 2 and "MODELPOOL_ETCD_PASSWORD" in err
    # a tenant's credentials cannot manage users (etcd reserves that to root)
    code, _, err = pool.ctl("tenants", "create", "delta", user="tenant-alpha")
    assert code == 255 and "permission denied" in err
    for args in (("auth", "enable"), ("auth", "disable"), ("auth", "status"), ("auth", "user", "create"),
                 ("auth", "user", "delete"), ("auth", "user", "list"), ("tenants", "create"), ("tenants", "list"),
                 ("tenants", "delete")):
        res = CliRunner().invoke(app, [*args, "--help"])
        assert res.exit_code == 0 and "Example:" in res.stdout, args


# -- what etcd refuses -------------------------------------------------------------------------------


async def test_a_tenant_writes_only_its_own_records(pool: AuthPool) -> None:
    k = pool.keys
    async with connected(pool.config("tenant-beta")) as beta, connected(pool.config("tenant-alpha")) as alpha:
        for key in (k.for_tenant("alpha").instance("m", "i1"), k.for_tenant("alpha").node("n1"),
                    k.tenant("alphabet") + "nodes/n1",
                    k.instance("m", "i1"), k.node("n1"),                                # the old layout
                    k.api_key("ab" * 32), k.model("m"), k.assignment("beta/n1", "a1"), k.current_plan,
                    k.node_control("beta/n1"), k.gateway("g1"), k.demand_entry("m", "g1"),
                    k.usage_entry("k", "m", "g1"), k.planner_leader, k.tokens + "t1", k.harvest + "h1",
                    "/other-pool/tenants/beta/nodes/n1"):
            await denied(beta, key)
        with pytest.raises(StoreAuthError, match="permission denied"):
            await beta.txn([], [Op.put(k.for_tenant("beta").node("n1"), b"ok"), Op.put(k.model("m"), b"x")])
        with pytest.raises(StoreAuthError, match="permission denied"):
            await beta.delete(k.tenant("alpha"), prefix=True)
        for prefix in (k.api_keys, k.tenant("alpha"), k.tenants, k.desired_for_node("alpha/n1"), k.usage,
                       k.plans, k.instances):
            with pytest.raises(StoreAuthError, match="permission denied"):
                await beta.list_prefix(prefix)

        # its own records, and what its agents read
        await beta.put(k.for_tenant("beta").node("n1"), NodeRecord(node_id="n1").SerializeToString())
        for prefix in (k.models, k.desired_for_node("beta/n1"), k.node_controls, k.gateways, k.tenant("beta")):
            await beta.list_prefix(prefix)
        await beta.revision()

        # leases: beta can neither pin a key on alpha's lease nor revoke it
        lease, _ = await alpha.grant_lease(30)
        await alpha.put(k.for_tenant("alpha").node("n1"), NodeRecord(node_id="n1").SerializeToString(), lease=lease)
        with pytest.raises(StoreAuthError, match="permission denied"):
            await beta.put(k.for_tenant("beta").node("n2"), b"x", lease=lease)
        with pytest.raises(StoreAuthError, match="permission denied"):
            await beta.revoke_lease(lease)
        await alpha.revoke_lease(lease)
        assert await alpha.list_prefix(k.tenant("alpha")) == ([], (await alpha.list_prefix(k.tenant("alpha")))[1])


async def test_service_roles_are_confined(pool: AuthPool) -> None:
    k = pool.keys
    async with connected(pool.config("gw")) as gw, connected(pool.config("planner-1")) as planner, \
            connected(pool.config("ops")) as ops:
        for key in (k.model("m"), k.api_key("cd" * 32), k.for_tenant("alpha").instance("m", "i"), k.instance("m", "i"),
                    k.assignment("alpha/n1", "a"), k.current_plan, k.tokens + "t"):
            await denied(gw, key)
        for key in (k.gateway("g1"), k.demand_entry("m", "g1"), k.usage_entry("k", "m", "g1"), k.gateways + "leader"):
            await gw.put(key, b"ok")
        for prefix in (k.tenants, k.instances, k.api_keys, k.models, k.tokens):
            await gw.list_prefix(prefix)
        for key in (k.model("m"), k.api_key("cd" * 32), k.for_tenant("alpha").node("n1"), k.node("n1"),
                    k.usage_entry("k", "m", "g1"), k.harvest + "h"):
            await denied(planner, key)
        for key in (k.assignment("alpha/n1", "a"), k.current_plan, k.planner_leader):
            await planner.put(key, b"ok")
        with pytest.raises(StoreAuthError, match="permission denied"):
            await planner.list_prefix(k.api_keys)
        await ops.put(k.model("ops-model"), ModelSpec(name="ops-model").SerializeToString())
        await ops.delete(k.model("ops-model"))
        for key in (k.gateway("g1"), k.demand_entry("m", "g1"), k.usage_entry("k", "m", "g1"), k.gateways + "leader",
                    k.assignment("alpha/n1", "a"), k.current_plan, k.planner_leader):
            await ops.delete(key)


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


# -- tokens expire; nothing else does ----------------------------------------------------------------


async def test_leases_watches_and_transactions_survive_token_expiry(pool: AuthPool) -> None:
    k = pool.keys
    mine = k.for_tenant("alpha").node("expiry")
    async with connected(pool.config("tenant-alpha")) as alpha, connected(pool.config("ops")) as ops:
        async def register(lease: int) -> None:
            await alpha.put(mine, NodeRecord(node_id="expiry").SerializeToString(), lease=lease)

        session = LeaseSession(alpha, 3, on_granted=register, name="expiry")
        session.start()
        loops = Supervisor()
        early = WatchedCache(alpha, k.models, proto_decoder(ModelSpec), name="early")
        early.start(loops)
        try:
            lease = await session.wait_alive(10)
            assert await early.wait_loaded(10)
            before = alpha.authentications
            await asyncio.sleep(3 * TOKEN_TTL_S)  # the token expires; keepalives carry on without it
            assert session.alive and session.lease_id == lease and session.losses == 0

            # a watch opened before the expiry still delivers
            await ops.put(k.model("after-expiry"), ModelSpec(name="after-expiry").SerializeToString())
            await eventually(lambda: asyncio.sleep(0, k.model("after-expiry") in early.items), timeout=5,
                             what="the early watch sees a change made after the token expired")
            assert early.lists == 1, "the watch never broke"

            # transactions and a watch opened after the expiry re-authenticate
            ok, _ = await alpha.txn([], [Op.put(mine, NodeRecord(node_id="expiry", pool=True).SerializeToString(),
                                                lease=lease)])
            assert ok and alpha.authentications == before + 1
            late = WatchedCache(alpha, k.tenant("alpha"), proto_decoder(NodeRecord), name="late")
            await asyncio.sleep(3 * TOKEN_TTL_S)
            late.start(loops)
            assert await late.wait_loaded(10) and mine in late.items

            # a lost lease is re-granted with an expired token, and the records come back
            await asyncio.sleep(3 * TOKEN_TTL_S)
            await ops.revoke_lease(lease)
            await eventually(lambda: asyncio.sleep(0, session.alive and session.lease_id not in (0, lease)),
                             timeout=10, what="a new lease")
            assert (await alpha.get(mine)) is not None
        finally:
            await loops.close()
            await session.close()
            await ops.delete(k.model("after-expiry"))


async def test_credentials_handed_out_before_auth_is_enabled_keep_working(tmp_path: Path) -> None:
    """The upgrade order of docs/etcd-layout.md: tenants and users first, agents and gateways
    restarted with credentials, then `ctl auth enable`; legacy records keep serving open models."""
    etcd = EtcdProcess.in_temp_dir(extra_args=("--bcrypt-cost", "4")).start()
    prefix = "/mp-upgrade"
    home = AuthPool(etcd, prefix, tmp_path)
    k = Keys(prefix)
    try:
        anonymous = await EtcdStore(home.config(None)).connect()
        await anonymous.put(k.model("restricted"), ModelSpec(name="restricted", servers=["alpha"]).SerializeToString())
        await anonymous.put(k.instance("open", "old-1"), instance("open", "old-1", "http://127.0.0.1:9"))
        await anonymous.put(k.instance("restricted", "old-2"), instance("restricted", "old-2", "http://127.0.0.1:9"))
        for tenant in ("alpha",):
            home.passwords[f"tenant-{tenant}"] = (await asyncio.to_thread(
                home.ctl_json, "tenants", "create", tenant, user="root"))["password"]
        home.passwords["gw"] = (await asyncio.to_thread(home.ctl_json, "auth", "user", "create", "gw", "--role",
                                                        "gateway", user="root"))["password"]
        config = GatewayConfig(etcd=home.config("gw"), auth=False, fleet=FleetSettings(lease_ttl_s=4))
        async with gateway_in_process(config) as (gw, _), connected(home.config("tenant-alpha")) as alpha:
            await alpha.put(k.for_tenant("alpha").instance("restricted", "new-1"),
                            instance("restricted", "new-1", "http://127.0.0.1:9"))

            async def table() -> tuple[set[str], set[str]]:
                return ({ep.instance_id for ep in gw.table.ready("open")},
                        {ep.instance_id for ep in gw.table.ready("restricted")})
            async def expected() -> bool:
                return await table() == ({"old-1"}, {"alpha/new-1"})
            await eventually(expected, timeout=10, what="legacy instance of the open model only")

            enabled = await asyncio.to_thread(home.ctl_json, "auth", "enable", user="root")
            assert enabled["was_enabled"] is False and enabled["root_user"] == "created"
            with pytest.raises(StoreAuthError):
                await anonymous.put(k.instance("open", "old-3"), b"x")     # the old layout: operators only now
            await alpha.put(k.for_tenant("alpha").instance("restricted", "new-2"),   # no token yet: one re-auth
                            instance("restricted", "new-2", "http://127.0.0.1:9"))

            async def after() -> bool:
                return await table() == ({"old-1"}, {"alpha/new-1", "alpha/new-2"})
            await eventually(after, timeout=10, what="the gateway follows etcd after auth was enabled")
        await anonymous.close()
    finally:
        etcd.stop()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELPOOL_ETCD_USER", "MODELPOOL_ETCD_PASSWORD", "MODELPOOL_ETCD_PASSWORD_FILE",
                 "MODELPOOL_TENANT"):
        monkeypatch.delenv(name, raising=False)
    assert "MODELPOOL_ETCD_PASSWORD" not in os.environ
