"""The planner's input: an immutable snapshot of the pool, the catalog, profiles and demand.

A `Snapshot` is everything `compute_plan` looks at; it never reads etcd or the clock. Build one in
code (the control plane does, from etcd records) or load one from YAML/JSON with `Snapshot.load`.
Every validation failure is a `SnapshotError` whose message names the offending field, e.g.
``nodes[2].free_gpu_indices: GPU index 9 is not one of the node's GPUs``.

Units: memory in GiB, throughput and demand in requests/s, prices in currency per GPU-hour,
times in unix seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Tensor-parallel degrees: the catalog's. Powers of two keep GPU packing exact (see model.py).
from controlplane.catalog import KNOWN_TP_DEGREES, check_tp_degree
from controlplane.tenancy import LEGACY


class SnapshotError(ValueError):
    """A snapshot could not be read or is invalid; the message names the field and the problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuInfo(_Frozen):
    """One GPU of a node."""

    index: int = Field(ge=0)
    type: str = Field(min_length=1)
    memory_gib: float = Field(gt=0)


class NodeInfo(_Frozen):
    """A node offering GPUs to the pool.

    `free_gpu_indices` are the GPUs nothing runs on. GPUs held by replicas listed in
    `Snapshot.current` count as available to the planner as well (keeping such a replica must be
    feasible), whether or not the agent also lists them as free.
    """

    node_id: str = Field(min_length=1)
    gpus: tuple[GpuInfo, ...] = ()
    free_gpu_indices: tuple[int, ...] = ()
    end_time_unix: int = Field(default=0, ge=0, description="0 = unknown / unlimited")
    draining: bool = False
    tenant: str = Field(default=LEGACY, description="whose agent offers the node (from its key path)")

    @model_validator(mode="after")
    def _check_indices(self) -> NodeInfo:
        seen: set[int] = set()
        for gpu in self.gpus:
            if gpu.index in seen:
                raise ValueError(f"gpus: GPU index {gpu.index} appears twice")
            seen.add(gpu.index)
        for idx in self.free_gpu_indices:
            if idx not in seen:
                raise ValueError(f"free_gpu_indices: GPU index {idx} is not one of the node's GPUs")
        if len(set(self.free_gpu_indices)) != len(self.free_gpu_indices):
            raise ValueError("free_gpu_indices: an index appears twice")
        return self

    def gpu(self, index: int) -> GpuInfo:
        """The GPU with this index (KeyError when absent)."""
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        raise KeyError(index)


class ModelInfo(_Frozen):
    """A catalog entry as the planner needs it."""

    name: str = Field(min_length=1)
    weight_memory_gib: float = Field(ge=0)
    kv_memory_gib: float = Field(default=0.0, ge=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=0, ge=0, description="0 = unbounded")
    allowed_gpu_types: tuple[str, ...] = Field(default=(), description="empty = any")
    tensor_parallel_options: tuple[int, ...] = Field(default=(), description="empty = derive from memory")
    servers: tuple[str, ...] = Field(default=(), description="tenants that may serve it; empty = any")
    reference_rps: float = Field(
        default=1.0,
        gt=0,
        description="requests/s of one TP=1 replica on a GPU of relative_speed 1.0; used without profiles",
    )

    @field_validator("tensor_parallel_options")
    @classmethod
    def _tp_known(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({check_tp_degree(tp) for tp in value}))

    @property
    def memory_gib(self) -> float:
        """Weights plus KV cache of one replica."""
        return self.weight_memory_gib + self.kv_memory_gib


class GpuTypeInfo(_Frozen):
    """Price and speed of one GPU type, relative to the others."""

    price_per_hour: float = Field(ge=0)
    relative_speed: float = Field(gt=0)


class ThroughputProfile(_Frozen):
    """Measured requests/s of one replica of `model` on `tp` GPUs of `gpu_type`."""

    model: str = Field(min_length=1)
    gpu_type: str = Field(min_length=1)
    tp: int
    requests_per_s: float = Field(ge=0)

    @field_validator("tp")
    @classmethod
    def _tp_known(cls, value: int) -> int:
        return check_tp_degree(value)


class RunningReplica(_Frozen):
    """A replica that runs now; `replica_id` (assignment or instance id) travels into KEEP/STOP actions."""

    node_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    tp: int = Field(ge=1)
    gpu_indices: tuple[int, ...]
    replica_id: str = ""

    @model_validator(mode="after")
    def _check_gpus(self) -> RunningReplica:
        if len(self.gpu_indices) != self.tp:
            raise ValueError(f"gpu_indices: {len(self.gpu_indices)} indices for tp={self.tp}")
        if len(set(self.gpu_indices)) != len(self.gpu_indices):
            raise ValueError("gpu_indices: an index appears twice")
        return self


class PlanWeights(_Frozen):
    """Objective weights, in the unit of prices (currency per hour).

    unmet_demand_penalty: per request/s of demand left unserved; keep it well above the cost of
    serving one request/s, or the planner prefers to leave demand unmet.
    churn_penalty: per replica started or stopped.
    min_replicas_penalty: per missing distinct node below a model's min_replicas.
    """

    unmet_demand_penalty: float = Field(default=50.0, ge=0)
    churn_penalty: float = Field(default=0.5, ge=0)
    min_replicas_penalty: float = Field(default=1000.0, ge=0)


class Snapshot(_Frozen):
    """Everything the planner decides from. Immutable; construct in code or with `load`."""

    nodes: tuple[NodeInfo, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    gpu_types: dict[str, GpuTypeInfo] = Field(default_factory=dict)
    profiles: tuple[ThroughputProfile, ...] = ()
    demand: dict[str, float] = Field(default_factory=dict, description="requests/s per model")
    budget_per_hour: float = Field(default=0.0, ge=0, description="0 = unlimited")
    horizon_s: float = Field(default=1800.0, ge=0)
    current: tuple[RunningReplica, ...] = ()
    weights: PlanWeights = Field(default_factory=PlanWeights)
    tp_scaling_efficiency: float = Field(
        default=0.9, gt=0, le=1, description="throughput factor per doubling of TP when scaling without a profile"
    )

    @field_validator("demand")
    @classmethod
    def _demand_non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for model, rps in value.items():
            if not math.isfinite(rps) or rps < 0:
                raise ValueError(f"{model}: demand must be a finite number >= 0, got {rps}")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> Snapshot:
        node_ids = [n.node_id for n in self.nodes]
        _reject_duplicates("nodes", "node_id", node_ids)
        _reject_duplicates("models", "name", [m.name for m in self.models])
        for i, node in enumerate(self.nodes):
            for j, gpu in enumerate(node.gpus):
                if gpu.type not in self.gpu_types:
                    raise ValueError(f"nodes[{i}].gpus[{j}].type: GPU type {gpu.type!r} is not in gpu_types")
        model_names = {m.name for m in self.models}
        for i, prof in enumerate(self.profiles):
            if prof.model not in model_names:
                raise ValueError(f"profiles[{i}].model: unknown model {prof.model!r}")
            if prof.gpu_type not in self.gpu_types:
                raise ValueError(f"profiles[{i}].gpu_type: GPU type {prof.gpu_type!r} is not in gpu_types")
        nodes = {n.node_id: n for n in self.nodes}
        held: dict[tuple[str, int], int] = {}
        for i, rep in enumerate(self.current):
            host = nodes.get(rep.node_id)
            if host is None:
                continue  # the node left; the planner emits a STOP so its desired record is cleaned up
            for idx in rep.gpu_indices:
                try:
                    host.gpu(idx)
                except KeyError:
                    raise ValueError(
                        f"current[{i}].gpu_indices: GPU {idx} is not a GPU of node {rep.node_id!r}"
                    ) from None
                other = held.setdefault((rep.node_id, idx), i)
                if other != i:
                    raise ValueError(
                        f"current[{i}].gpu_indices: GPU {idx} of {rep.node_id!r} is also held by current[{other}]"
                    )
        return self

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Mapping[str, Any], source: str = "snapshot") -> Snapshot:
        """Validate a parsed mapping; errors name the field (``nodes[3].gpus[0].memory_gib: ...``)."""
        if not isinstance(data, Mapping):
            raise SnapshotError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(describe_validation_error(err) for err in exc.errors())
            raise SnapshotError(f"{source}: {problems}") from None

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a snapshot from a .yaml/.yml or .json file."""
        p = Path(path)
        data = read_data_file(p, SnapshotError)
        return cls.from_data(data if data is not None else {}, source=str(p))

    # ---- derived facts (pure) ------------------------------------------------------------

    def node_accepts_new(self, node: NodeInfo, now: float) -> bool:
        """Whether new replicas may start on `node`: not draining and not leaving within the horizon."""
        if node.draining:
            return False
        return node.end_time_unix == 0 or node.end_time_unix >= now + self.horizon_s

    def model(self, name: str) -> ModelInfo | None:
        """The catalog entry called `name`, or None."""
        for m in self.models:
            if m.name == name:
                return m
        return None


def tp_options(model: ModelInfo, gpu_memory_gib: float) -> tuple[int, ...]:
    """Tensor-parallel degrees at which `model` fits on GPUs with `gpu_memory_gib` each.

    With explicit options, those that fit. Otherwise the smallest of 1, 2, 4, 8 whose total memory
    holds weights + KV cache, plus the next larger one (more KV room, sometimes more throughput).
    """
    fitting = [tp for tp in KNOWN_TP_DEGREES if tp * gpu_memory_gib >= model.memory_gib]
    if model.tensor_parallel_options:
        return tuple(tp for tp in model.tensor_parallel_options if tp in fitting)
    return tuple(fitting[:2])


def gpu_type_allowed(model: ModelInfo, gpu_type: str) -> bool:
    """Whether the catalog lets `model` run on `gpu_type`."""
    return not model.allowed_gpu_types or gpu_type in model.allowed_gpu_types


def tenant_allowed(model: ModelInfo, tenant: str | None) -> bool:
    """Whether a node of ``tenant`` may serve ``model`` (``ModelSpec.servers``; the gateway routes to
    nobody else). ``None`` is a class of nodes of several tenants: only for unrestricted models."""
    return not model.servers or (tenant is not None and tenant in model.servers)


class ThroughputTable:
    """Requests/s of one replica per (model, GPU type, TP): profiles first, then a scaling rule.

    Without an exact profile: a profile of the same model and TP on another type scales by the
    ratio of relative speeds; else the profile of the same model with the nearest TP scales by
    speed and by TP (each doubling multiplies by 2 * tp_scaling_efficiency); else
    `reference_rps * relative_speed` scaled by TP the same way.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snap = snapshot
        self._profiles: dict[str, list[ThroughputProfile]] = {}
        for prof in snapshot.profiles:
            self._profiles.setdefault(prof.model, []).append(prof)
        self._cache: dict[tuple[str, str, int], float] = {}

    def _tp_scale(self, tp: int) -> float:
        return tp * self._snap.tp_scaling_efficiency ** math.log2(tp)

    def rps(self, model: ModelInfo, gpu_type: str, tp: int) -> float:
        """Requests/s one replica of `model` serves on `tp` GPUs of `gpu_type`."""
        key = (model.name, gpu_type, tp)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._compute(model, gpu_type, tp)
        return cached

    def _compute(self, model: ModelInfo, gpu_type: str, tp: int) -> float:
        speed = self._snap.gpu_types[gpu_type].relative_speed
        profs = self._profiles.get(model.name, [])
        for prof in profs:
            if prof.gpu_type == gpu_type and prof.tp == tp:
                return prof.requests_per_s
        same_tp = [p for p in profs if p.tp == tp]
        if same_tp:
            best = min(same_tp, key=lambda p: p.gpu_type)
            return best.requests_per_s * speed / self._snap.gpu_types[best.gpu_type].relative_speed
        if profs:
            best = min(profs, key=lambda p: (abs(math.log2(p.tp) - math.log2(tp)), p.tp, p.gpu_type))
            ref_speed = self._snap.gpu_types[best.gpu_type].relative_speed
            return best.requests_per_s * (speed / ref_speed) * (self._tp_scale(tp) / self._tp_scale(best.tp))
        return model.reference_rps * speed * self._tp_scale(tp)


def _reject_duplicates(section: str, field: str, values: list[str]) -> None:
    seen: set[str] = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ValueError(f"{section}[{i}].{field}: duplicate {v!r}")
        seen.add(v)


def read_data_file(path: Path, error: type[Exception]) -> Any:
    """The parsed content of a ``.json`` (JSON) or other (YAML) file, None when empty; ``error``
    naming the file when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise error(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from None


def describe_validation_error(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``field.path[3].name: message``."""
    loc = ""
    for part in err.get("loc", ()):
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
