"""Node and instance records of both key layouts, read at one revision, each with its tenant.

    read_pool(store, keys) ──▶ tenants/ at R, nodes/ at R, instances/ at R ──▶ pool_records (pure)
                                                                                  │
         PoolRecords(nodes: NodeEntry…, instances: InstanceEntry…, warnings) ◀────┘

The tenant of a record is the one its key names (controlplane/tenancy.py); a record's own
``node_id`` is only the node's id *within* that tenant, so everything that relates instances to
nodes or names a node to the planner uses the node ref (``<tenant>/<node_id>``). `ctl status`,
`ctl nodes`, `ctl tenants` and the planner read the pool through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from controlplane.keys import Keys, RecordDecodeError, decode
from controlplane.pb import InstanceRecord, NodeRecord
from controlplane.store import EtcdStore, KeyValue
from controlplane.tenancy import node_ref, parse_pool_key


@dataclass(frozen=True)
class NodeEntry:
    """One node record: its key, tenant, ref and the record as the agent wrote it."""

    kv: KeyValue
    tenant: str
    ref: str
    record: NodeRecord


@dataclass(frozen=True)
class InstanceEntry:
    """One instance record: its key, tenant, the model and id its key names, its node's ref."""

    kv: KeyValue
    tenant: str
    model: str
    instance_id: str
    node_ref: str
    record: InstanceRecord


@dataclass(frozen=True)
class PoolRecords:
    """Every node and instance record at ``revision`` (both layouts)."""

    revision: int
    nodes: tuple[NodeEntry, ...] = ()
    instances: tuple[InstanceEntry, ...] = ()
    warnings: tuple[str, ...] = ()
    other_keys: int = 0          # keys under tenants/ that are neither (ignored)
    mod_revisions: dict[str, int] = field(default_factory=dict)

    def node(self, ref: str) -> NodeEntry | None:
        """The node with node ref ``ref``, if registered."""
        return next((n for n in self.nodes if n.ref == ref), None)

    def tenants(self) -> set[str]:
        """Tenants with at least one record."""
        return {n.tenant for n in self.nodes} | {i.tenant for i in self.instances}


async def read_pool(store: EtcdStore, keys: Keys, *, revision: int = 0) -> PoolRecords:
    """List ``tenants/``, ``nodes/`` and ``instances/`` at one revision (the newest, or ``revision``)."""
    tenant_kvs, rev = await store.list_prefix(keys.tenants, revision=revision)
    node_kvs, _ = await store.list_prefix(keys.nodes, revision=rev)
    inst_kvs, _ = await store.list_prefix(keys.instances, revision=rev)
    return pool_records(keys.prefix, rev, [*tenant_kvs, *node_kvs, *inst_kvs])


def pool_records(prefix: str, revision: int, kvs: Iterable[KeyValue]) -> PoolRecords:
    """Decode node and instance records from ``kvs`` (pure). Undecodable records become warnings;
    a legacy node whose id equals a tenant node's ref (an id with '/') is left out with one."""
    nodes: dict[str, NodeEntry] = {}
    instances: list[InstanceEntry] = []
    warnings: list[str] = []
    mods: dict[str, int] = {}
    other = 0
    for kv in kvs:
        parsed = parse_pool_key(prefix, kv.key)
        if parsed is None:
            other += 1
            continue
        mods[kv.key] = kv.mod_revision
        try:
            if parsed.kind == "node":
                rec = decode(NodeRecord, kv)
                ref = parsed.node_ref
                if ref in nodes:
                    warnings.append(f"{kv.key}: node ref {ref!r} is taken by {nodes[ref].kv.key}; left out")
                    continue
                nodes[ref] = NodeEntry(kv, parsed.tenant, ref, rec)
            else:
                inst = decode(InstanceRecord, kv)
                instances.append(InstanceEntry(kv, parsed.tenant, parsed.model, parsed.instance_id,
                                               node_ref(parsed.tenant, inst.node_id), inst))
        except RecordDecodeError as exc:
            warnings.append(str(exc))
    return PoolRecords(revision, tuple(sorted(nodes.values(), key=lambda n: n.ref)),
                       tuple(sorted(instances, key=lambda i: (i.model, i.tenant, i.instance_id))),
                       tuple(warnings), other, mods)
