"""Read what the harvester decides from, at one etcd revision, and build the pure views.

The pool part is the planner's own read (`controlplane.planner.live.read_live`: nodes listed at
the newest revision R, everything else at R) plus, at R, the harvest job records and the node
controls. `pool_view` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.harvest.model import PoolView
from controlplane.keys import Keys, decode_all, decode_segment
from controlplane.pb import HarvestJob, HarvestStatus, NodeControl
from controlplane.planner.live import ClusterConfig, LiveRecords, assemble_snapshot, read_live
from controlplane.store import EtcdStore

#: NodeControl.requested_by of the drains the harvester writes (so it only ever clears its own).
DRAINED_BY = "modelpool harvest"


@dataclass(frozen=True)
class HarvestRead:
    """Everything read from etcd for one round."""

    records: LiveRecords
    jobs: dict[str, HarvestJob]
    controls: dict[str, NodeControl]
    status: HarvestStatus | None
    warnings: tuple[str, ...]


async def read_harvest(store: EtcdStore, keys: Keys) -> HarvestRead:
    """The pool (as the planner reads it), the harvest records and node controls, at one revision."""
    records = await read_live(store, keys)
    rev = records.revision
    job_kvs, _ = await store.list_prefix(keys.harvest_jobs, revision=rev)
    ctl_kvs, _ = await store.list_prefix(keys.node_controls, revision=rev)
    status_kv = await store.get(keys.harvest_status)
    warnings: list[str] = []
    jobs = {decode_segment(kv.key.rsplit("/", 1)[-1]): job for kv, job in decode_all(HarvestJob, job_kvs, warnings)}
    controls = {decode_segment(kv.key.rsplit("/", 1)[-1]): c for kv, c in decode_all(NodeControl, ctl_kvs, warnings)}
    status = None
    if status_kv is not None:
        decoded = decode_all(HarvestStatus, [status_kv], warnings)
        status = decoded[0][1] if decoded else None
    return HarvestRead(records, jobs, controls, status, tuple(warnings))


def pool_view(read: HarvestRead, cluster: ClusterConfig, *,
              demand_override: Mapping[str, float] | None = None) -> tuple[PoolView, tuple[str, ...]]:
    """The pure view `decide` takes, and the warnings of assembling it."""
    assembly = assemble_snapshot(read.records, cluster, demand_override=demand_override)
    node_by_job = {n.slurm.job_id: n.node_id for n in read.records.nodes if n.slurm.job_id}
    busy = frozenset(a.node_id for a in read.records.desired)
    with_instances = frozenset(i.node_id for i in read.records.instances)
    ours = frozenset(node for node, c in read.controls.items() if c.drain and c.requested_by.startswith(DRAINED_BY))
    view = PoolView(snapshot=assembly.snapshot, node_by_job=node_by_job, busy_nodes=busy,
                    nodes_with_instances=with_instances, drained_by_us=ours)
    return view, (*read.warnings, *assembly.warnings)
