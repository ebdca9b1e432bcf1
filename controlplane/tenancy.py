"""Tenants: who registered a record, read from its key path, and who may serve a model (pure).

A tenant is a group of researchers who run agents with one set of etcd credentials. Its agents
write only under ``<prefix>/tenants/<tenant>/`` (etcd's roles enforce it, see
controlplane/roles.py), so the tenant of a record is the one its key names, never a field the
agent wrote. Records in the old layout (``<prefix>/nodes/…``, ``<prefix>/instances/…``) belong
to the reserved tenant ``legacy`` (docs/etcd-layout.md, "Upgrading to the tenant layout").

    <prefix>/tenants/<tenant>/nodes/<node_id>                  NodeRecord
    <prefix>/tenants/<tenant>/instances/<model>/<instance_id>  InstanceRecord
    <prefix>/nodes/<node_id>                                   NodeRecord      tenant "legacy"
    <prefix>/instances/<model>/<instance_id>                   InstanceRecord  tenant "legacy"

A node is named by its *node ref*: ``<tenant>/<node_id>`` for a tenant's node, the bare node id
for a legacy one. Desired assignments and drain controls are keyed by the ref (one percent-encoded
segment), so two tenants' agents that pick the same node id never read each other's work.

Who may serve a model is ``ModelSpec.servers``: the tenants allowed to register instances of it
that gateways route to. Empty means any tenant (the model is *community-served*); a model that is
not in the catalog is community-served too; a catalog record that does not decode may be served
by nobody (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.pb import ModelSpec

#: The tenant of records in the pre-tenant layout. Reserved: `ctl tenants create` refuses it.
LEGACY = "legacy"

#: The tenant an agent registers as when neither --tenant nor a tenant's etcd user names one
#: (etcd auth off: `ctl dev`, tests).
DEFAULT_TENANT = "default"

#: etcd role and user names of a tenant are this prefix plus its name.
TENANT_ROLE_PREFIX = "tenant-"

RESERVED_TENANTS = frozenset({LEGACY})

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")

#: ``servers`` of a model anyone may serve.
ANY_TENANT: None = None

Servers = frozenset[str] | None
"""Who may serve a model: a set of tenant names, or None for any tenant (community-served)."""


class TenantNameError(ValueError):
    """A tenant name that cannot be one: the message says why."""


def check_tenant_name(name: str, *, allow_reserved: bool = False) -> str:
    """``name`` when it is a valid tenant name (lower-case letters, digits, '-'; 1-32 characters;
    starting and ending with a letter or digit); TenantNameError otherwise."""
    if not _NAME.match(name):
        raise TenantNameError(f"tenant name {name!r}: use 1-32 lower-case letters, digits and '-', "
                              "starting and ending with a letter or digit")
    if name in RESERVED_TENANTS and not allow_reserved:
        raise TenantNameError(f"tenant name {name!r} is reserved (records of the old key layout)")
    return name


def is_tenant_name(name: str) -> bool:
    """True for a valid, non-reserved tenant name."""
    return bool(_NAME.match(name)) and name not in RESERVED_TENANTS


def tenant_role(name: str) -> str:
    """The etcd role (and user) name of tenant ``name``."""
    return TENANT_ROLE_PREFIX + name


def tenant_of_user(user: str | None) -> str | None:
    """The tenant an etcd user is the user of (``tenant-alice`` → ``alice``), else None."""
    if user and user.startswith(TENANT_ROLE_PREFIX) and is_tenant_name(user[len(TENANT_ROLE_PREFIX):]):
        return user[len(TENANT_ROLE_PREFIX):]
    return None


# -- node refs ------------------------------------------------------------------------------------


def node_ref(tenant: str, node_id: str) -> str:
    """How the planner, desired/ and control/ name a node: ``tenant/node_id`` (legacy: node_id)."""
    return node_id if tenant == LEGACY else f"{tenant}/{node_id}"


def split_node_ref(ref: str) -> tuple[str, str]:
    """(tenant, node id) of a node ref; a ref without a valid tenant in front is a legacy node's."""
    tenant, sep, node_id = ref.partition("/")
    if sep and node_id and is_tenant_name(tenant):
        return tenant, node_id
    return LEGACY, ref


def check_node_id(node_id: str) -> str:
    """``node_id`` when an agent may register under it (non-empty, no '/', printable, <= 200 chars)."""
    if not node_id or "/" in node_id or len(node_id) > 200 or not node_id.isprintable():
        raise ValueError(f"node id {node_id!r}: must be 1-200 printable characters without '/'")
    return node_id


# -- who may serve ---------------------------------------------------------------------------------


def servers_of(spec: ModelSpec | None) -> Servers:
    """Who may serve the model of ``spec`` (None: any tenant; a missing spec: any tenant)."""
    if spec is None or not spec.servers:
        return ANY_TENANT
    return frozenset(spec.servers)


def may_serve(servers: Servers, tenant: str) -> bool:
    """True when ``tenant`` may serve a model whose servers are ``servers``.

    The legacy tenant is no exception: it may serve community models and models that list
    ``legacy`` (an operator's choice during the upgrade); once etcd auth is on, only operators
    can write the old layout.
    """
    return servers is None or tenant in servers


def refusal_reason(servers: Servers, tenant: str, model: str) -> str:
    """Why ``tenant``'s instance of ``model`` is not routed ("" when it may serve it)."""
    if may_serve(servers, tenant):
        return ""
    assert servers is not None
    if not servers:
        return f"model {model!r} has an unreadable catalog record: nobody may serve it"
    return f"tenant {tenant!r} may not serve model {model!r} (servers: {', '.join(sorted(servers))})"


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What a key of a node or instance record names (parsed from the key alone)."""

    kind: str               # "node" or "instance"
    tenant: str             # LEGACY for the old layout
    node_id: str = ""       # kind == "node"
    model: str = ""         # kind == "instance"
    instance_id: str = ""   # kind == "instance"

    @property
    def node_ref(self) -> str:
        """The node ref of a node key."""
        return node_ref(self.tenant, self.node_id)


def parse_pool_key(prefix: str, key: str) -> PoolKey | None:
    """The node or instance a key names, in either layout; None for any other key.

    ``prefix`` is the pool's key prefix (``/modelpool``). A tenant segment that is not a valid
    tenant name (``legacy`` included) names nothing: such a key is not a tenant's record.
    """
    from urllib.parse import unquote

    if not key.startswith(prefix + "/"):
        return None
    parts = key[len(prefix) + 1:].split("/")
    tenant = LEGACY
    if parts[0] == "tenants":
        if len(parts) < 3 or not is_tenant_name(parts[1]):
            return None
        tenant, parts = parts[1], parts[2:]
    if len(parts) == 2 and parts[0] == "nodes" and parts[1]:
        return PoolKey("node", tenant, node_id=unquote(parts[1]))
    if len(parts) == 3 and parts[0] == "instances" and parts[1] and parts[2]:
        return PoolKey("instance", tenant, model=unquote(parts[1]), instance_id=unquote(parts[2]))
    return None


def tenants_in(keys: Iterable[str], prefix: str) -> set[str]:
    """Tenants that have at least one node or instance record among ``keys``."""
    return {pk.tenant for k in keys if (pk := parse_pool_key(prefix, k)) is not None}
