"""etcd roles of a pool: which key ranges each kind of credential may read and write (pure).

`ctl auth enable` creates the service roles and `ctl tenants create` a tenant's role from these
tables; docs/security.md prints them as the role table (a test keeps the two equal). Every
permission is a key range of this pool's prefix, so several pools in one etcd keep their own.

    role           reads                                              writes
    admin          everything under <prefix>/                         everything under <prefix>/
    gateway        tenants/ instances/ keys/ models/ tokens/          gateways/ accounting/ demand/ usage/
    planner        tenants/ nodes/ instances/ models/ gateways/        desired/ plans/ planner/
                   demand/ harvest/
    harvester      tenants/ nodes/ instances/ models/ gateways/        harvest/
                   demand/ desired/ plans/
    tenant-<t>     models/ control/nodes/ desired/<t>%2F…             tenants/<t>/

Gateway records carry demand and per-key rate-limit load (key ids and rates: who uses how
much), so tenants do not read ``gateways/``.

Every role also reads the single key ``<prefix>/`` (what `EtcdStore.probe` counts). Leases are
not in the table: etcd lets any user grant one and keep any lease alive, and it refuses to
revoke a lease or attach a key to it unless the user may write every key already on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from controlplane.keys import Keys, encode_segment
from controlplane.tenancy import check_tenant_name, tenant_role


class Access(enum.StrEnum):
    """etcd's permission types."""

    read = "read"
    write = "write"
    readwrite = "readwrite"


@dataclass(frozen=True, order=True, slots=True)
class Perm:
    """One etcd permission: ``key`` alone (``range_end`` empty) or the range [key, range_end)."""

    key: str
    range_end: str
    access: Access

    @classmethod
    def prefix(cls, prefix: str, access: Access) -> Perm:
        """Every key that starts with ``prefix``."""
        return cls(prefix, range_end_of(prefix), access)

    @classmethod
    def single(cls, key: str, access: Access) -> Perm:
        """The one key ``key``."""
        return cls(key, "", access)

    def describe(self, prefix: str) -> str:
        """``read tenants/…`` style, relative to the pool prefix (for tables and docs)."""
        rel = self.key[len(prefix) + 1:] if self.key.startswith(prefix + "/") else self.key
        if not self.range_end:
            return f"{self.access} {rel or '<prefix>/'} (key)"
        if self.range_end == range_end_of(self.key):
            return f"{self.access} {rel or '<prefix>/'}*"
        return f"{self.access} [{self.key}, {self.range_end})"


def range_end_of(prefix: str) -> str:
    """The end of the key range of ``prefix`` (etcd's prefix range end: last byte + 1).

    Keys here are ASCII (the pool prefix, percent-encoded segments); anything else is refused
    rather than turned into a range that means something else."""
    if not prefix or not prefix.isascii() or prefix.endswith("\x7f"):
        raise ValueError(f"cannot build an etcd permission range for {prefix!r}: ASCII prefixes only")
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class ServiceRole(enum.StrEnum):
    """Roles of modelpool's own components and operators (`ctl auth user create --role`)."""

    admin = "admin"
    gateway = "gateway"
    planner = "planner"
    harvester = "harvester"


#: Names `ctl auth user create` and `ctl tenants create` never hand out.
RESERVED_USERS = frozenset({"root"})


def service_role_perms(keys: Keys, role: ServiceRole) -> tuple[Perm, ...]:
    """The permissions of a service role on the pool under ``keys.prefix``."""
    r, rw = Access.read, Access.readwrite
    probe = Perm.single(keys.root, r)
    if role is ServiceRole.admin:
        return (Perm.prefix(keys.root, rw),)
    if role is ServiceRole.gateway:
        return _sorted(probe, *(Perm.prefix(p, r) for p in (keys.tenants, keys.instances, keys.api_keys, keys.models,
                                                             keys.tokens)),
                       *(Perm.prefix(p, rw) for p in (keys.gateways, keys.accounting, keys.demand, keys.usage)))
    if role is ServiceRole.planner:
        return _sorted(probe, *(Perm.prefix(p, r) for p in (keys.tenants, keys.nodes, keys.instances, keys.models,
                                                             keys.gateways, keys.demand, keys.harvest)),
                       *(Perm.prefix(p, rw) for p in (keys.desired, keys.plans, keys.planner)))
    if role is ServiceRole.harvester:
        return _sorted(probe, *(Perm.prefix(p, r) for p in (keys.tenants, keys.nodes, keys.instances, keys.models,
                                                             keys.gateways, keys.demand, keys.desired, keys.plans)),
                       Perm.prefix(keys.harvest, rw))
    raise ValueError(f"unknown role {role!r}")  # pragma: no cover - the enum is exhaustive


def tenant_perms(keys: Keys, tenant: str) -> tuple[Perm, ...]:
    """What tenant ``tenant``'s agents may do: write their own records, read what an agent needs.

    Desired assignments and drain controls are keyed by node ref (``<tenant>/<node_id>``,
    percent-encoded as ``<tenant>%2F<node_id>``), so a tenant reads only its own nodes' desired
    state. It reads every drain control (they name node refs and reasons, nothing secret), but
    not the gateways' records (they carry per-key traffic).
    """
    check_tenant_name(tenant)
    r = Access.read
    own_desired = keys.desired + encode_segment(f"{tenant}/")
    return _sorted(Perm.single(keys.root, r), Perm.prefix(keys.tenant(tenant), Access.readwrite),
                   Perm.prefix(keys.models, r), Perm.prefix(keys.node_controls, r),
                   Perm.prefix(own_desired, r))


def role_perms(keys: Keys, role: str) -> tuple[Perm, ...]:
    """Permissions of any role modelpool manages (service role or ``tenant-<name>``)."""
    if role in ServiceRole.__members__:
        return service_role_perms(keys, ServiceRole(role))
    if role.startswith("tenant-"):
        return tenant_perms(keys, role.removeprefix("tenant-"))
    raise ValueError(f"{role!r} is not a modelpool role")


def in_pool(keys: Keys, perm: Perm) -> bool:
    """True when ``perm`` is about this pool's keys (sync leaves other pools' permissions alone)."""
    return perm.key == keys.root or perm.key.startswith(keys.root)


def perm_changes(keys: Keys, current: tuple[Perm, ...], wanted: tuple[Perm, ...]) -> tuple[list[Perm], list[Perm]]:
    """(grant, revoke) that turn a role's ``current`` permissions on this pool into ``wanted``.

    Granting an existing (key, range_end) with another access replaces it in etcd, so a changed
    access is one grant; only ranges no longer wanted are revoked.
    """
    have = {(p.key, p.range_end): p for p in current if in_pool(keys, p)}
    want = {(p.key, p.range_end): p for p in wanted}
    grant = [p for k, p in sorted(want.items()) if have.get(k) != p]
    revoke = [p for k, p in sorted(have.items()) if k not in want]
    return grant, revoke


def _sorted(*perms: Perm) -> tuple[Perm, ...]:
    return tuple(sorted(perms))


__all__ = [
    "RESERVED_USERS",
    "Access",
    "Perm",
    "ServiceRole",
    "in_pool",
    "perm_changes",
    "range_end_of",
    "role_perms",
    "service_role_perms",
    "tenant_perms",
    "tenant_role",
]


#: Who holds each role (docs/security.md's role table is ``role_table()``).
ROLE_HOLDERS: dict[str, str] = {
    "admin": "operators: `ctl models`, `ctl keys`, `ctl apply`, `ctl nodes drain`, `ctl status`, `ctl usage`",
    "gateway": "every gateway process (`ctl gateway`)",
    "planner": "the planner daemon (`ctl planner run`), and `ctl plan` / `ctl apply` run by it",
    "harvester": "the harvest daemon (writes `harvest/`; the planner reads it)",
    "tenant-<t>": "the agents of tenant `<t>` (`ctl agent --etcd-user tenant-<t>`, the sbatch templates)",
}


def role_table(prefix: str = "/modelpool") -> str:
    """The role table as docs/security.md prints it (Markdown), generated from the tables above."""
    keys = Keys(prefix)
    rows = ["| role | held by | reads | reads and writes |", "|---|---|---|---|"]
    roles: list[tuple[str, tuple[Perm, ...]]] = [(r.value, service_role_perms(keys, r)) for r in ServiceRole]
    roles.append(("tenant-<t>", tenant_perms(keys, "t")))
    for name, perms in roles:
        def cell(access: Access, perms: tuple[Perm, ...] = perms) -> str:
            items = [p.describe(prefix).split(" ", 1)[1] for p in perms if p.access is access]
            items = [i.replace("tenants/t/", "tenants/<t>/").replace("desired/t%2F", "desired/<t>%2F")
                     for i in items]
            return ", ".join(f"`{i}`" for i in items) or "-"
        rows.append(f"| `{name}` | {ROLE_HOLDERS[name]} | {cell(Access.read)} | {cell(Access.readwrite)} |")
    return "\n".join(rows)
