"""What `ctl auth` and `ctl tenants` do, as functions over an EtcdStore (tests call them directly).

    enable_auth     root user (created, or its password set while auth is off), the service
                    roles and every tenant role synced to controlplane/roles.py, then auth on
    create_user     a service user (gateway, planner, admin, harvester) with a random password
    create_tenant   role tenant-<name> + user tenant-<name> with a random password
    delete_tenant   user and role deleted (its tokens die at once), its records' leases revoked,
                    its records, desired assignments and drain controls deleted: its instances
                    leave every gateway's routing table as soon as the deletes are watched
    list_tenants    tenant roles and users, plus every tenant that has records

Every one of these needs etcd's root role once auth is on (etcd reserves user and role changes
to it). Passwords are 32 random URL-safe characters, printed once and never stored by us.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from controlplane.keys import Keys, encode_segment
from controlplane.poolstate import read_pool
from controlplane.roles import RESERVED_USERS, ServiceRole, role_perms, service_role_perms, tenant_perms
from controlplane.store import EtcdStore, StoreError
from controlplane.store.admin import EtcdAdmin
from controlplane.tenancy import TENANT_ROLE_PREFIX, check_tenant_name, tenant_role

ROOT = "root"


class AuthAdminError(Exception):
    """Base of what these operations refuse; ``code`` is the `ctl` exit code to use."""

    code = 255


class AlreadyExists(AuthAdminError):
    """The user, role or tenant exists already."""

    code = 4


class NotFound(AuthAdminError):
    """Nothing by that name."""

    code = 3


class BadName(AuthAdminError):
    """A name that cannot be used."""

    code = 2


def new_password() -> str:
    """A random password (192 bits)."""
    return secrets.token_urlsafe(24)


def check_user_name(name: str) -> str:
    """A service user name: 1-64 of [A-Za-z0-9._-], not ``root``, not ``tenant-…`` (tenants' own)."""
    if not name or len(name) > 64 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise BadName(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if name in RESERVED_USERS or name.startswith(TENANT_ROLE_PREFIX):
        raise BadName(f"user name {name!r} is reserved (root, and tenant-* for `ctl tenants create`)")
    return name


@dataclass
class EnableReport:
    """What `ctl auth enable` did."""

    was_enabled: bool
    root: str                                   # created | password set | existing
    roles: dict[str, dict[str, int]] = field(default_factory=dict)   # role -> {"granted", "revoked"}

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": True, "was_enabled": self.was_enabled, "root_user": self.root, "roles": self.roles}


async def enable_auth(store: EtcdStore, keys: Keys, root_password: str) -> EnableReport:
    """Create or refresh every role of this pool and turn etcd authentication on (idempotent).

    ``store`` connects as root (with auth still off, any connection works; the root user is
    created with ``root_password``, or given it when it exists: while auth is off anyone could).
    """
    admin = EtcdAdmin(store)
    was_enabled = await admin.auth_enabled()
    root = "existing"
    if not was_enabled:
        if ROOT in await admin.users():
            await admin.set_password(ROOT, root_password)
            root = "password set"
        else:
            await admin.add_user(ROOT, root_password)
            root = "created"
        await admin.grant_role(ROOT, ROOT)
    report = EnableReport(was_enabled, root)
    roles = [r.value for r in ServiceRole] + [r for r in await admin.roles() if r.startswith(TENANT_ROLE_PREFIX)]
    for role in roles:
        try:
            wanted = role_perms(keys, role)
        except ValueError:
            continue  # a tenant-* role we did not make (a name we cannot parse): leave it alone
        granted, revoked = await admin.sync_role(keys, role, wanted)
        report.roles[role] = {"granted": len(granted), "revoked": len(revoked)}
    if not was_enabled:
        await admin.enable()
    return report


async def disable_auth(store: EtcdStore) -> bool:
    """Turn authentication off; False when it was off already."""
    admin = EtcdAdmin(store)
    if not await admin.auth_enabled():
        return False
    await admin.disable()
    return True


async def create_user(store: EtcdStore, keys: Keys, name: str, role: ServiceRole) -> dict[str, str]:
    """A new service user with ``role`` (the role is synced first); returns user, role, password."""
    check_user_name(name)
    admin = EtcdAdmin(store)
    if name in await admin.users():
        raise AlreadyExists(f"etcd user {name!r} exists already (`ctl auth user delete {name}` first)")
    await admin.sync_role(keys, role.value, service_role_perms(keys, role))
    password = new_password()
    await admin.add_user(name, password)
    await admin.grant_role(name, role.value)
    return {"user": name, "role": role.value, "password": password}


async def delete_user(store: EtcdStore, name: str) -> None:
    """Delete a service user (tenants' users go with `delete_tenant`)."""
    check_user_name(name)
    admin = EtcdAdmin(store)
    if name not in await admin.users():
        raise NotFound(f"no etcd user {name!r}")
    await admin.delete_user(name)


async def list_users(store: EtcdStore) -> list[dict[str, Any]]:
    """Every etcd user with its roles."""
    admin = EtcdAdmin(store)
    return [{"user": u, "roles": await admin.user_roles(u) or []} for u in await admin.users()]


async def create_tenant(store: EtcdStore, keys: Keys, name: str) -> dict[str, str]:
    """Role and user ``tenant-<name>``; returns tenant, user, role, password (shown once)."""
    try:
        check_tenant_name(name)
    except ValueError as exc:
        raise BadName(str(exc)) from None
    admin = EtcdAdmin(store)
    role = tenant_role(name)
    if role in await admin.users() or role in await admin.roles():
        raise AlreadyExists(f"tenant {name!r} exists already (etcd user or role {role!r})")
    await admin.sync_role(keys, role, tenant_perms(keys, name))
    password = new_password()
    await admin.add_user(role, password)
    await admin.grant_role(role, role)
    return {"tenant": name, "user": role, "role": role, "password": password}


async def delete_tenant(store: EtcdStore, keys: Keys, name: str) -> dict[str, Any]:
    """Revoke tenant ``name``: its credentials stop working first, then its records go.

    Order matters: the user and role go first (etcd invalidates the user's tokens), so nothing the
    tenant still runs can write again; then the leases its records are on are revoked (an agent
    keeps a lease alive without any permission) and whatever is left under tenants/<name>/ and
    its nodes' desired/ and control/ keys is deleted.
    """
    try:
        check_tenant_name(name)
    except ValueError as exc:
        raise BadName(str(exc)) from None
    admin = EtcdAdmin(store)
    role = tenant_role(name)
    user_deleted = role_deleted = False
    if role in await admin.users():
        await admin.delete_user(role)
        user_deleted = True
    if role in await admin.roles():
        await admin.delete_role(role)
        role_deleted = True
    kvs, _ = await store.list_prefix(keys.tenant(name))
    leases = {kv.lease for kv in kvs if kv.lease}
    revoked = await admin.revoke_leases(leases)
    records = await store.delete(keys.tenant(name), prefix=True)
    own = encode_segment(f"{name}/")
    desired = await store.delete(keys.desired + own, prefix=True)
    controls = await store.delete(keys.node_controls + own, prefix=True)
    if not (user_deleted or role_deleted or kvs or desired or controls):
        raise NotFound(f"no tenant {name!r}: no etcd user or role {role!r} and no records")
    return {"tenant": name, "user_deleted": user_deleted, "role_deleted": role_deleted, "leases_revoked": revoked,
            "records_deleted": len(kvs), "records_left_after_revoke": records, "desired_deleted": desired,
            "controls_deleted": controls}


async def list_tenants(store: EtcdStore, keys: Keys) -> tuple[list[dict[str, Any]], list[str]]:
    """Tenants (roles, users, record counts) and warnings (e.g. roles unreadable without root)."""
    warnings: list[str] = []
    admin = EtcdAdmin(store)
    roles: set[str] = set()
    users: set[str] = set()
    try:
        roles = {r for r in await admin.roles() if r.startswith(TENANT_ROLE_PREFIX)}
        users = {u for u in await admin.users() if u.startswith(TENANT_ROLE_PREFIX)}
    except StoreError as exc:
        warnings.append(f"cannot list etcd roles and users (needs root): {exc}")
    pool = await read_pool(store, keys)
    warnings.extend(pool.warnings)
    names = {r[len(TENANT_ROLE_PREFIX):] for r in roles | users} | pool.tenants()
    out = []
    for name in sorted(names):
        role = tenant_role(name)
        out.append({
            "tenant": name, "role": role if role in roles else "", "user": role if role in users else "",
            "nodes": sum(n.tenant == name for n in pool.nodes),
            "instances": sum(i.tenant == name for i in pool.instances),
        })
    return out, warnings
