"""Build a planner `Snapshot` from etcd: read everything at one revision, then assemble (pure).

    read_live(store, keys) ──▶ LiveRecords        tenants/ listed at revision R (the newest), then
        │                                          nodes/, instances/ (legacy), desired/, models/,
        │                                          gateways/, demand/, plans/ listed *at R*: one consistent cut
        ▼
    assemble_snapshot(records, cluster, now) ──▶ Assembly(snapshot, warnings, invalid)

What comes from where:

* tenants: a node or instance belongs to the tenant its key names (controlplane/tenancy.py); the
  planner names nodes by *node ref* (``<tenant>/<node_id>``, a legacy node by its id) and
  ``read_live`` rewrites ``node_id`` of node and instance records to it, so every relation below
  (instances on a node, desired/<ref>/) stays within one tenant. A model with ``servers`` is
  placed only on nodes of those tenants (the gateway would not route to the others).
* nodes: ``NodeRecord`` with ``pool = true`` (the agent's ``--pool`` flag); GPUs, ``draining``,
  ``end_time_unix``. Free GPUs are the record's ``free_gpu_indices`` minus GPUs that an instance
  record claims without a desired assignment behind it (an instance still draining after a STOP).
* current: the desired assignments (``desired/<node>/<id>``), not the instance records. Desired
  is what was committed; an assignment applied a second ago has no instance yet, and a replan
  that ignored it would start a duplicate and orphan its key. The assignment id is the replica id,
  so KEEP/STOP actions name the key to keep or delete.
* models: the catalog (``ModelSpec``); ``reference_rps`` comes from the cluster file.
* demand: the sum over gateways of ``Demand.requests_per_second`` per model (or an override), from
  each gateway's ``GatewayRecord.demand`` (and the per-model ``demand/`` records of older gateways).
* everything else (prices, speeds, profiles, budget, horizon, weights): `ClusterConfig`.

A node whose GPU type the cluster file does not price is left out *with its assignments*
(neither started on nor stopped) and named in the warnings: a typo in the cluster file must not
stop running replicas. An assignment the snapshot cannot represent (GPUs not on its node, GPUs
shared with another assignment, a TP degree the planner does not know) is returned in
``invalid``; the plan deletes it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.accounting.demand import demand_of
from controlplane.keys import Keys, RecordDecodeError, decode, decode_segment
from controlplane.pb import Assignment, Demand, GatewayRecord, InstanceRecord, ModelSpec, NodeRecord, PlanRecord
from controlplane.planner.snapshot import (
    KNOWN_TP_DEGREES,
    GpuInfo,
    GpuTypeInfo,
    ModelInfo,
    NodeInfo,
    PlanWeights,
    RunningReplica,
    Snapshot,
    SnapshotError,
    ThroughputProfile,
    describe_validation_error,
    read_data_file,
)
from controlplane.poolstate import read_pool
from controlplane.store import EtcdStore, KeyValue
from controlplane.tenancy import split_node_ref

GIB = float(1 << 30)


class ClusterConfigError(ValueError):
    """The cluster file cannot be read or is invalid; the message names the file and field."""


class ClusterConfig(BaseModel):
    """The part of a snapshot that is not live state: prices, speeds, profiles, budget, weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_types: dict[str, GpuTypeInfo] = Field(default_factory=dict)
    profiles: tuple[ThroughputProfile, ...] = ()
    budget_per_hour: float = Field(default=0.0, ge=0, description="0 = unlimited")
    horizon_s: float = Field(default=1800.0, ge=0)
    weights: PlanWeights = Field(default_factory=PlanWeights)
    tp_scaling_efficiency: float = Field(default=0.9, gt=0, le=1)
    reference_rps: dict[str, float] = Field(
        default_factory=dict, description="requests/s of one TP=1 replica at relative_speed 1.0, per model"
    )
    default_reference_rps: float = Field(default=1.0, gt=0)

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        """Read a cluster file (.yaml/.yml or .json); ClusterConfigError names the field."""
        p = Path(path)
        data = _read_mapping(p, ClusterConfigError)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ClusterConfigError(f"{p}: " + "; ".join(describe_validation_error(e) for e in exc.errors())) from None


def load_demand(path: str | Path) -> dict[str, float]:
    """A demand override file: ``{model: requests/s}`` (or ``{demand: {...}}``), YAML or JSON."""
    p = Path(path)
    data = _read_mapping(p, SnapshotError)
    if isinstance(data.get("demand"), Mapping):
        data = dict(data["demand"])
    out: dict[str, float] = {}
    for model, rps in data.items():
        if isinstance(rps, bool) or not isinstance(rps, int | float) or rps < 0:
            raise SnapshotError(f"{p}: demand[{model!r}]: expected a number >= 0, got {rps!r}")
        out[str(model)] = float(rps)
    return out


@dataclass(frozen=True)
class LiveRecords:
    """Decoded records read at one etcd revision, plus each key's mod revision (for apply guards).

    Desired assignments carry their node id and assignment id from the key (the key is what the
    agent matches on), whatever the record's own fields say.
    """

    revision: int
    nodes: tuple[NodeRecord, ...] = ()
    instances: tuple[InstanceRecord, ...] = ()
    desired: tuple[Assignment, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    demand: tuple[Demand, ...] = ()
    current_plan: PlanRecord | None = None
    mod_revisions: Mapping[str, int] = field(default_factory=dict)
    decode_warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Assembly:
    """A snapshot plus what did not make it in."""

    snapshot: Snapshot
    warnings: tuple[str, ...]
    invalid: tuple[Assignment, ...]       # desired assignments to delete (cannot be represented)


async def read_live(store: EtcdStore, keys: Keys) -> LiveRecords:
    """Read every prefix the planner needs at one revision (the newest when tenants/ was listed)."""
    pool = await read_pool(store, keys)
    rev = pool.revision
    at = {name: (await store.list_prefix(prefix, revision=rev))[0] for name, prefix in (
        ("desired", keys.desired), ("models", keys.models),
        ("demand", keys.demand), ("gateways", keys.gateways),
        ("plans", keys.current_plan.rsplit("/", 1)[0] + "/"))}
    warnings: list[str] = list(pool.warnings)
    mods: dict[str, int] = dict(pool.mod_revisions)

    def decoded(kvs: Sequence[KeyValue], msg_type: type[Any]) -> list[Any]:
        out = []
        for kv in kvs:
            mods[kv.key] = kv.mod_revision
            try:
                out.append(decode(msg_type, kv))
            except RecordDecodeError as exc:
                warnings.append(str(exc))
        return out

    desired: list[Assignment] = []
    for kv in at["desired"]:
        for a in decoded([kv], Assignment):
            node_seg, id_seg = kv.key[len(keys.desired):].split("/", 1)
            a.node_id, a.assignment_id = decode_segment(node_seg), decode_segment(id_seg)
            desired.append(a)
    plans = [kv for kv in at["plans"] if kv.key == keys.current_plan]
    current = decoded(plans, PlanRecord)
    nodes, instances = [], []
    for n in pool.nodes:
        node = NodeRecord()
        node.CopyFrom(n.record)
        node.node_id = n.ref
        nodes.append(node)
    for i in pool.instances:
        inst = InstanceRecord()
        inst.CopyFrom(i.record)
        inst.node_id = i.node_ref
        instances.append(inst)
    return LiveRecords(
        revision=rev,
        nodes=tuple(nodes),
        instances=tuple(instances),
        desired=tuple(desired),
        models=tuple(decoded(at["models"], ModelSpec)),
        # gateways publish demand in their GatewayRecord; demand/<model>/<gw> is from older gateways
        demand=tuple(demand_of(decoded(at["gateways"], GatewayRecord), decoded(at["demand"], Demand))),
        current_plan=current[0] if current else None,
        mod_revisions=mods,
        decode_warnings=tuple(warnings),
    )


def assemble_snapshot(records: LiveRecords, cluster: ClusterConfig, *,
                      demand_override: Mapping[str, float] | None = None) -> Assembly:
    """Turn records into a validated Snapshot (pure; see the module docstring for the rules)."""
    warnings = list(records.decode_warnings)
    nodes: dict[str, NodeInfo] = {}
    skipped: set[str] = set()
    by_node: dict[str, list[Assignment]] = defaultdict(list)
    for a in records.desired:
        by_node[a.node_id].append(a)
    for rec in sorted(records.nodes, key=lambda r: r.node_id):
        if not rec.pool:
            continue
        unknown = sorted({g.type for g in rec.gpus} - set(cluster.gpu_types))
        if unknown:
            warnings.append(f"node {rec.node_id}: GPU type(s) {', '.join(unknown)} not in the cluster file's "
                            "gpu_types; node left out of planning (its assignments are left as they are)")
            skipped.add(rec.node_id)
            continue
        nodes[rec.node_id] = _node_info(rec, by_node.get(rec.node_id, []), records.instances)
    current: list[RunningReplica] = []
    invalid: list[Assignment] = []
    for node_id in sorted(by_node):
        if node_id in skipped:
            continue
        held: set[int] = set()
        for a in sorted(by_node[node_id], key=lambda x: x.assignment_id):
            problem = _assignment_problem(a, nodes.get(node_id), held)
            if problem:
                warnings.append(f"assignment {node_id}/{a.assignment_id}: {problem}; it will be deleted")
                invalid.append(a)
                continue
            held.update(a.gpu_indices)
            current.append(RunningReplica(node_id=node_id, model=a.model, tp=len(a.gpu_indices),
                                          gpu_indices=tuple(a.gpu_indices), replica_id=a.assignment_id))
    models = tuple(_model_info(spec, cluster) for spec in sorted(records.models, key=lambda s: s.name))
    names = {m.name for m in models}
    profiles = tuple(p for p in cluster.profiles if p.model in names and p.gpu_type in cluster.gpu_types)
    if demand_override is not None:
        demand = dict(demand_override)
    else:
        sums: dict[str, float] = defaultdict(float)
        for d in records.demand:
            sums[d.model] += max(0.0, d.requests_per_second)
        demand = dict(sums)
    snapshot = Snapshot.from_data({
        "nodes": [n.model_dump() for n in nodes.values()],
        "models": [m.model_dump() for m in models],
        "gpu_types": {k: v.model_dump() for k, v in cluster.gpu_types.items()},
        "profiles": [p.model_dump() for p in profiles],
        "demand": demand,
        "budget_per_hour": cluster.budget_per_hour,
        "horizon_s": cluster.horizon_s,
        "current": [r.model_dump() for r in current],
        "weights": cluster.weights.model_dump(),
        "tp_scaling_efficiency": cluster.tp_scaling_efficiency,
    }, source=f"etcd at revision {records.revision}")
    return Assembly(snapshot, tuple(warnings), tuple(invalid))


async def snapshot_from_etcd(store: EtcdStore, keys: Keys, cluster: ClusterConfig,
                             demand_override: Mapping[str, float] | None = None) -> tuple[Snapshot, int]:
    """The planner's snapshot of the live pool and the etcd revision it was read at."""
    records = await read_live(store, keys)
    return assemble_snapshot(records, cluster, demand_override=demand_override).snapshot, records.revision


# -- helpers --------------------------------------------------------------------------------------


def _node_info(rec: NodeRecord, assignments: Sequence[Assignment], instances: Sequence[InstanceRecord]) -> NodeInfo:
    indices = {g.index for g in rec.gpus}
    desired_ids = {a.assignment_id for a in assignments}
    # An instance whose assignment is gone is still draining: its GPUs are busy until it exits.
    draining_gpus = {g for inst in instances if inst.node_id == rec.node_id
                     and inst.assignment_id not in desired_ids for g in inst.gpu_indices}
    free = sorted((set(rec.free_gpu_indices) & indices) - draining_gpus)
    return NodeInfo(
        node_id=rec.node_id,
        tenant=split_node_ref(rec.node_id)[0],
        gpus=tuple(GpuInfo(index=g.index, type=g.type, memory_gib=max(g.memory_bytes / GIB, 1e-9))
                   for g in sorted(rec.gpus, key=lambda g: g.index)),
        free_gpu_indices=tuple(free),
        end_time_unix=max(0, rec.end_time_unix or rec.slurm.end_time_unix),
        draining=rec.draining,
    )


def _assignment_problem(a: Assignment, node: NodeInfo | None, held: set[int]) -> str:
    """Why an assignment cannot be a RunningReplica ("" when it can)."""
    gpus = list(a.gpu_indices)
    if not gpus:
        return "no GPU indices"
    if len(set(gpus)) != len(gpus):
        return f"GPU indices {gpus} repeat"
    if len(gpus) not in KNOWN_TP_DEGREES:
        return f"{len(gpus)} GPUs is not a tensor-parallel degree the planner knows"
    if not a.model:
        return "no model"
    if node is None:
        return ""  # node gone or not in the pool: the planner stops it
    own = {g.index for g in node.gpus}
    if set(gpus) - own:
        return f"GPUs {sorted(set(gpus) - own)} are not GPUs of the node"
    if set(gpus) & held:
        return f"GPUs {sorted(set(gpus) & held)} are also held by another assignment"
    return ""


def _model_info(spec: ModelSpec, cluster: ClusterConfig) -> ModelInfo:
    return ModelInfo(
        name=spec.name,
        weight_memory_gib=spec.weight_memory_bytes / GIB,
        kv_memory_gib=spec.kv_memory_bytes / GIB,
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        allowed_gpu_types=tuple(spec.allowed_gpu_types),
        tensor_parallel_options=tuple(t for t in spec.tensor_parallel_options if t in KNOWN_TP_DEGREES),
        reference_rps=cluster.reference_rps.get(spec.name, cluster.default_reference_rps),
        servers=tuple(sorted(spec.servers)),
    )


def _read_mapping(p: Path, error: type[ValueError]) -> dict[str, Any]:
    data = read_data_file(p, error)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise error(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)

