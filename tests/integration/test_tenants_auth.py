"""etcd authentication and roles made by `ctl` (docs/security.md): what each credential may do, and
that leases, watches and transactions live through token expiry (an etcd of their own:
tests/authpool.py; its tokens expire after 2 s idle)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.loops import Supervisor
from controlplane.pb import ModelSpec, NodeRecord
from controlplane.roles import ServiceRole, service_role_perms, tenant_perms
from controlplane.store import EtcdStore, LeaseSession, Op, StoreAuthError
from controlplane.store.cache import WatchedCache, proto_decoder
from gateway.app import GatewayConfig
from gateway.fleet import FleetSettings
from tests.authpool import TOKEN_TTL_S, AuthPool, auth_pool, connected, denied, instance
from tests.cluster import eventually, gateway_in_process


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthPool]:
    yield from auth_pool(tmp_path_factory)


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
        for prefix in (k.models, k.desired_for_node("beta/n1"), k.node_controls, k.tenant("beta")):
            await beta.list_prefix(prefix)
        with pytest.raises(StoreAuthError, match="permission denied"):   # per-key traffic lives there
            await beta.list_prefix(k.gateways)
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
