"""Tenants, roles and who may serve: the pure parts (key parsing, permissions, routing filter, planner)."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from controlplane.catalog import CatalogError, parse_catalog, spec_to_entry
from controlplane.keys import Keys
from controlplane.pb import InstanceRecord, InstanceState, ModelSpec
from controlplane.planner.diff import ActionKind
from controlplane.planner.model import compute_plan
from controlplane.planner.snapshot import Snapshot
from controlplane.roles import (
    Access,
    Perm,
    ServiceRole,
    perm_changes,
    range_end_of,
    role_table,
    service_role_perms,
    tenant_perms,
)
from controlplane.store import EtcdConfig, EtcdConfigError, KeyValue
from controlplane.store.cache import Replaced, proto_decoder, to_event
from controlplane.store.client import token_problem
from controlplane.store.watch import Change, Changes, Resync
from controlplane.tenancy import (
    LEGACY,
    TenantNameError,
    check_tenant_name,
    may_serve,
    node_ref,
    parse_pool_key,
    refusal_reason,
    split_node_ref,
    tenant_of_user,
)
from gateway.table import RoutingTable
from gateway.tenancy import ServePolicy, model_card

K = Keys("/p")
tenant_names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(lambda n: n != LEGACY)
ids = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)


# -- names and keys --------------------------------------------------------------------------------


def test_tenant_names() -> None:
    for good in ("a", "nlp-lab", "x9", "a" * 32):
        assert check_tenant_name(good) == good
    for bad in ("", "A", "-a", "a-", "a_b", "a/b", "a b", "a" * 33, "tenant%2F"):
        with pytest.raises(TenantNameError):
            check_tenant_name(bad)
    with pytest.raises(TenantNameError, match="reserved"):
        check_tenant_name(LEGACY)
    assert check_tenant_name(LEGACY, allow_reserved=True) == LEGACY
    assert tenant_of_user("tenant-nlp") == "nlp" and tenant_of_user("gw") is None and tenant_of_user(None) is None
    assert tenant_of_user("tenant-legacy") is None and tenant_of_user("tenant-") is None


@given(tenant=tenant_names, model=ids, iid=ids, node=ids.filter(lambda n: "/" not in n))
def test_keys_name_their_tenant_model_and_node(tenant: str, model: str, iid: str, node: str) -> None:
    tk = K.for_tenant(tenant)
    inst = parse_pool_key("/p", tk.instance(model, iid))
    assert inst is not None
    assert (inst.kind, inst.tenant, inst.model, inst.instance_id) == ("instance", tenant, model, iid)
    nd = parse_pool_key("/p", tk.node(node))
    assert nd is not None and (nd.kind, nd.tenant, nd.node_id, nd.node_ref) == ("node", tenant, node,
                                                                                f"{tenant}/{node}")
    legacy = parse_pool_key("/p", K.instance(model, iid))
    assert legacy is not None and legacy.tenant == LEGACY and legacy.model == model
    assert split_node_ref(node_ref(tenant, node)) == (tenant, node)
    assert K.node_key_of_ref(node_ref(tenant, node)) == tk.node(node)
    assert K.node_key_of_ref(node) == K.node(node) and split_node_ref(node) == (LEGACY, node)
    # a tenant's writable range holds its records and nothing of any other tenant's
    own = K.tenant(tenant)
    assert tk.instance(model, iid).startswith(own) and tk.node(node).startswith(own)


def test_keys_that_name_no_record() -> None:
    for key in ("/p/tenants/legacy/nodes/n", "/p/tenants/Bad/nodes/n", "/p/tenants/a/desired/x", "/p/tenants/a",
                "/p/tenants/a/instances/m", "/p/nodes/", "/p/keys/ab", "/q/nodes/n", "/p/instances/m/i/x"):
        assert parse_pool_key("/p", key) is None, key


@given(a=tenant_names, b=tenant_names)
def test_no_tenant_range_overlaps_another_tenants_keys(a: str, b: str) -> None:
    if a == b:
        return
    for perm in tenant_perms(K, a):
        for key in (K.for_tenant(b).node("n"), K.for_tenant(b).instance("m", "i"), K.desired_for_node(f"{b}/n") + "x",
                    K.tenant(b)):
            inside = perm.key <= key < perm.range_end if perm.range_end else key == perm.key
            assert not (inside and perm.access is not Access.read and key.startswith(K.tenants)), (perm, key)
            if key.startswith(K.desired):
                assert not inside, (perm, key)      # nobody reads another tenant's desired state


def test_role_permissions() -> None:
    assert range_end_of("/p/tenants/a/") == "/p/tenants/a0"
    gateway = {p.describe("/p") for p in service_role_perms(K, ServiceRole.gateway)}
    assert "read tenants/*" in gateway and "readwrite usage/*" in gateway and "read keys/*" in gateway
    assert not any("desired" in p or ("models/*" in p and "readwrite" in p) for p in gateway)
    tenant = {p.describe("/p") for p in tenant_perms(K, "nlp")}
    assert tenant == {"read <prefix>/ (key)", "readwrite tenants/nlp/*", "read models/*",
                      "read control/nodes/*", "read desired/nlp%2F*"}
    admin = service_role_perms(K, ServiceRole.admin)
    assert admin == (Perm("/p/", "/p0", Access.readwrite),)


def test_perm_changes_touch_only_this_pool() -> None:
    wanted = tenant_perms(K, "a")
    other_pool = Perm.prefix("/q/tenants/a/", Access.readwrite)
    stale = Perm.prefix("/p/tenants/", Access.read)
    changed = Perm(wanted[1].key, wanted[1].range_end, Access.readwrite)
    grant, revoke = perm_changes(K, (other_pool, stale, changed, *wanted[2:]), wanted)
    assert revoke == [stale] and grant == sorted([wanted[0], wanted[1]])
    assert perm_changes(K, wanted, wanted) == ([], [])


def test_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELPOOL_ETCD_USER", "MODELPOOL_ETCD_PASSWORD", "MODELPOOL_ETCD_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    cfg = EtcdConfig.from_env("e:1", user="tenant-a", password_file=pw)
    assert cfg.password == "s3cret" and "s3cret" not in repr(cfg)
    monkeypatch.setenv("MODELPOOL_ETCD_PASSWORD", "from-env")
    assert EtcdConfig.from_env("e:1", user="u", password_file=pw).password == "s3cret"   # the flag wins
    assert EtcdConfig.from_env("e:1", user="u").password == "from-env"
    monkeypatch.delenv("MODELPOOL_ETCD_PASSWORD")
    monkeypatch.setenv("MODELPOOL_ETCD_PASSWORD_FILE", str(pw))
    assert EtcdConfig.from_env("e:1", user="u").password == "s3cret"
    for content, problem in (("", "empty"), ("\n", "empty"), ("x" * 5000, "larger")):
        pw.write_text(content)
        with pytest.raises(EtcdConfigError, match=problem):
            EtcdConfig.from_env("e:1", user="u", password_file=pw)
    with pytest.raises(EtcdConfigError, match="cannot read"):
        EtcdConfig.from_env("e:1", user="u", password_file=tmp_path / "missing")
    monkeypatch.delenv("MODELPOOL_ETCD_PASSWORD_FILE")
    with pytest.raises(EtcdConfigError, match="no password for etcd user 'u'"):
        EtcdConfig.from_env("e:1", user="u")


def test_token_problems_are_told_from_permission_problems() -> None:
    assert token_problem(RuntimeError("KV.Range failed: etcdserver: invalid auth token"))
    assert token_problem(RuntimeError("etcdserver: revision of auth store is old"))
    assert token_problem(RuntimeError("etcdserver: user name is empty"))
    assert not token_problem(RuntimeError("KV.Put failed: etcdserver: permission denied"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = RuntimeError("etcdserver: invalid auth token")
    assert token_problem(wrapped)


# -- who may serve ------------------------------------------------------------------------------------


def test_may_serve() -> None:
    assert may_serve(None, "anyone") and may_serve(None, LEGACY)
    assert may_serve(frozenset({"a"}), "a") and not may_serve(frozenset({"a"}), "b")
    assert not may_serve(frozenset({"a"}), LEGACY) and may_serve(frozenset({"a", LEGACY}), LEGACY)
    assert not may_serve(frozenset(), "a")                             # an unreadable catalog record
    assert "servers: a" in refusal_reason(frozenset({"a"}), "b", "m")
    assert "unreadable" in refusal_reason(frozenset(), "b", "m") and refusal_reason(None, "b", "m") == ""


def test_catalog_servers() -> None:
    (spec,) = parse_catalog({"models": [{"name": "m", "weight_memory_gib": 1, "servers": ["b", "a", "a"]}]})
    assert list(spec.servers) == ["a", "b"] and spec_to_entry(spec)["servers"] == ["a", "b"]
    (open_,) = parse_catalog([{"name": "o", "weight_memory_gib": 1}])
    assert list(open_.servers) == []
    for bad in (["Bad"], ["a/b"], [""]):
        with pytest.raises(CatalogError, match="field 'servers'"):
            parse_catalog([{"name": "m", "weight_memory_gib": 1, "servers": bad}])


def kv(key: str, rec: InstanceRecord | ModelSpec | bytes, rev: int = 1) -> KeyValue:
    value = rec if isinstance(rec, bytes) else rec.SerializeToString()
    return KeyValue(key, value, rev, rev, 1, 0)


def inst(model: str, iid: str, state: InstanceState = InstanceState.READY) -> InstanceRecord:
    return InstanceRecord(instance_id=iid, model=model, node_id="n1", endpoint=f"http://10.0.0.1/{iid}", state=state,
                          owner="whoever-the-agent-claims")


INST = proto_decoder(InstanceRecord)
SPEC = proto_decoder(ModelSpec)


def test_routing_table_refuses_tenants_the_catalog_does_not_list_and_logs_once() -> None:
    policy = ServePolicy()
    table = RoutingTable(prefix="/p", servers=policy.servers)
    policy.on_change = table.policy_changed
    a, b = K.for_tenant("alpha"), K.for_tenant("beta")
    policy.apply(to_event(Resync({K.model("secret"): kv(K.model("secret"), ModelSpec(name="secret",
                                                                                      servers=["alpha"]))}, 1), SPEC))
    with structlog.testing.capture_logs() as logs:
        table.apply(to_event(Resync({k: kv(k, r) for k, r in (
            (a.instance("secret", "i1"), inst("secret", "i1")),
            (b.instance("secret", "i1"), inst("secret", "i1")),          # same id, other tenant
            (b.instance("open", "o1"), inst("open", "o1")))}, 2), INST), K.tenants)
        table.apply(to_event(Resync({K.instance("secret", "old"): kv(K.instance("secret", "old"),
                                                                     inst("secret", "old"))}, 3), INST), K.instances)
        for rev in range(4, 10):   # the refused instance keeps changing: still one log line
            table.apply(to_event(Changes((Change(b.instance("secret", "i1"), kv(b.instance("secret", "i1"), inst(
                "secret", "i1", InstanceState.READY if rev % 2 else InstanceState.DRAINING), rev)),), rev), INST))
    refusals = [e for e in logs if e["event"] == "instance refused: not routed"]
    assert sorted(e["instance"] for e in refusals) == ["beta/i1", "old"]
    assert [ep.instance_id for ep in table.ready("secret")] == ["alpha/i1"]
    assert [ep.instance_id for ep in table.ready("open")] == ["beta/o1"]
    assert set(table.refused()) == {b.instance("secret", "i1"), K.instance("secret", "old")}
    assert len(table) == 4 and table.ready("secret")[0].tenant == "alpha" and table.ready("secret")[0].node_id == \
        "alpha/n1"

    # a Replaced of one cache leaves the other cache's records alone
    table.apply(to_event(Resync({}, 11), INST), K.instances)
    assert len(table) == 3 and K.instance("secret", "old") not in table.refused()

    # the operator adds beta: routed at once; the catalog record turns unreadable: nobody serves it
    policy.apply(to_event(Changes((Change(K.model("secret"), kv(K.model("secret"), ModelSpec(
        name="secret", servers=["alpha", "beta"]), 12)),), 12), SPEC))
    assert len(table.ready("secret")) == 2 and not table.refused()
    policy.apply(to_event(Changes((Change(K.model("secret"), kv(K.model("secret"), b"\xff\xff")),), 13), SPEC))
    assert table.ready("secret") == () and len(table.refused()) == 2
    policy.apply(to_event(Changes((Change(K.model("secret"), None),), 14), SPEC))   # not in the catalog: anyone
    assert len(table.ready("secret")) == 2

    card = model_card("open", table.ready("open"), policy.servers("open"), 0)
    assert card["community_served"] is True and card["served_by"] == ["beta"] and card["owned_by"] == "beta"


def test_a_record_whose_key_names_another_model_is_not_routed() -> None:
    table = RoutingTable(prefix="/p")
    key = K.for_tenant("beta").instance("harmless", "i1")
    table.apply(to_event(Resync({key: kv(key, inst("secret", "i1"))}, 1), INST), K.tenants)
    assert len(table) == 0 and table.ready("secret") == () and table.ready("harmless") == ()
    assert isinstance(to_event(Resync({}, 1), INST), Replaced)


# -- the planner --------------------------------------------------------------------------------------


def test_planner_places_a_restricted_model_only_on_its_tenants_nodes() -> None:
    nodes = [{"node_id": f"{t}/n{i}", "tenant": t, "gpus": [{"index": 0, "type": "A100", "memory_gib": 80}],
              "free_gpu_indices": [0]} for t, count in (("alpha", 1), ("beta", 3)) for i in range(count)]
    snap = Snapshot.from_data({
        "nodes": nodes,
        "models": [{"name": "secret", "weight_memory_gib": 10, "min_replicas": 2, "servers": ["alpha"]},
                   {"name": "open", "weight_memory_gib": 10, "min_replicas": 1}],
        "gpu_types": {"A100": {"price_per_hour": 1.0, "relative_speed": 1.0}},
        "demand": {"secret": 50.0, "open": 1.0},
    })
    plan = compute_plan(snap, 0.0, time_limit_s=20)
    starts = [(a.model, a.node_id) for a in plan.actions if a.kind is ActionKind.START]
    # secret wants every GPU; only alpha's one node may serve it (min_replicas 2 stays short)
    assert [n for m, n in starts if m == "secret"] == ["alpha/n0"], starts
    assert any(m == "open" and n.startswith("beta/") for m, n in starts), starts
    assert all(not n.startswith("beta/") for m, n in starts if m == "secret")
    # a running replica on a tenant that may no longer serve it is stopped
    snap2 = Snapshot.from_data({**snap.model_dump(), "current": [
        {"node_id": "beta/n0", "model": "secret", "tp": 1, "gpu_indices": [0], "replica_id": "r1"}]})
    plan2 = compute_plan(snap2, 0.0, time_limit_s=20)
    assert any(a.kind is ActionKind.STOP and a.node_id == "beta/n0" for a in plan2.actions), plan2.actions


def test_security_doc_prints_the_role_table() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text(encoding="utf-8")
    assert role_table() in doc, "docs/security.md's role table differs from controlplane/roles.py: paste role_table()"
