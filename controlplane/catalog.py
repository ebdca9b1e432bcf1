"""The model catalog file: YAML or JSON in, validated `ModelSpec` messages out (pure, no etcd).

    models:                         # or a bare list of entries
      - name: llama-3.1-8b          # what clients put in "model" (may contain '/')
        engine: vllm                # vllm | sglang | command | sim   (default: vllm)
        source: meta-llama/Llama-3.1-8B-Instruct
        engine_args: [--max-model-len, "8192"]
        weight_memory_gib: 16
        kv_memory_gib: 4
        min_replicas: 1
        max_replicas: 4             # 0 = unbounded
        allowed_gpu_types: [H100, A100-80GB]     # empty = any
        tensor_parallel_options: [1, 2]          # empty = derive from memory
        access: {public: true, allowed_owners: []}
        owner: ml-team
        servers: [ml-team]          # tenants whose instances gateways route to; empty = any tenant
                                    # (community-served); "legacy" = agents of the old key layout

Every problem is a `CatalogError` whose message names the model and the field, e.g.
``model 'llama-3.1-8b': field 'min_replicas': must be <= max_replicas (4), got 6``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controlplane.pb import ModelAccess, ModelSpec
from controlplane.tenancy import check_tenant_name

#: Engines the agent has adapters for (agent/engines/__init__.py; a test keeps the two equal).
#: Not imported from there: the control plane must not depend on the agent package.
KNOWN_ENGINES: tuple[str, ...] = ("command", "sglang", "sim", "vllm")

#: Tensor-parallel degrees a replica may use; the planner's snapshot imports them from here.
KNOWN_TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)


def check_tp_degree(tp: int) -> int:
    """``tp`` when it is one of KNOWN_TP_DEGREES; ValueError naming them otherwise."""
    if tp not in KNOWN_TP_DEGREES:
        raise ValueError(f"tensor parallel degree {tp} is not one of {list(KNOWN_TP_DEGREES)}")
    return tp

GIB = 1 << 30


class CatalogError(ValueError):
    """The catalog file cannot be read or an entry is invalid; the message says which and why."""


class AccessEntry(BaseModel):
    """Who may see a model: everyone (public) or the listed owners."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public: bool = True
    allowed_owners: tuple[str, ...] = ()


class CatalogEntry(BaseModel):
    """One model as written in the catalog file (memory in GiB)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    name: str = Field(min_length=1)
    engine: str = "vllm"
    source: str = ""
    engine_args: tuple[str, ...] = ()
    weight_memory_gib: float = Field(ge=0)
    kv_memory_gib: float = Field(default=0.0, ge=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=0, ge=0, description="0 = unbounded")
    allowed_gpu_types: tuple[str, ...] = ()
    tensor_parallel_options: tuple[int, ...] = ()
    access: AccessEntry = Field(default_factory=AccessEntry)
    owner: str = ""
    servers: tuple[str, ...] = ()

    @field_validator("servers")
    @classmethod
    def _tenant_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            check_tenant_name(name, allow_reserved=True)
        return tuple(sorted(set(value)))

    @field_validator("engine")
    @classmethod
    def _engine_known(cls, value: str) -> str:
        if value not in KNOWN_ENGINES:
            raise ValueError(f"unknown engine {value!r}; known engines: {', '.join(KNOWN_ENGINES)}")
        return value

    @field_validator("weight_memory_gib", "kv_memory_gib")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("tensor_parallel_options")
    @classmethod
    def _tp_known(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted({check_tp_degree(tp) for tp in value}))

    @field_validator("allowed_gpu_types", "engine_args")
    @classmethod
    def _no_empty_items(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not item for item in value):
            raise ValueError("items must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _replica_bounds(self) -> CatalogEntry:
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}")
        return self

    def to_spec(self) -> ModelSpec:
        """The etcd record for this entry (memory converted to bytes)."""
        return ModelSpec(
            name=self.name,
            engine=self.engine,
            source=self.source,
            engine_args=list(self.engine_args),
            weight_memory_bytes=round(self.weight_memory_gib * GIB),
            kv_memory_bytes=round(self.kv_memory_gib * GIB),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            allowed_gpu_types=list(self.allowed_gpu_types),
            tensor_parallel_options=list(self.tensor_parallel_options),
            access=ModelAccess(public=self.access.public, allowed_owners=list(self.access.allowed_owners)),
            owner=self.owner,
            servers=list(self.servers),
        )


def parse_catalog(data: Any) -> list[ModelSpec]:
    """Validate already-parsed catalog data (``{"models": [...]}`` or a list) into ModelSpecs.

    Every entry is checked before any is returned; the first error raises CatalogError.
    """
    entries = _entries(data)
    specs: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(entries):
        label = _label(raw, i)
        if not isinstance(raw, Mapping):
            raise CatalogError(f"{label}: expected a mapping of fields, got {type(raw).__name__}")
        try:
            entry = CatalogEntry.model_validate(raw)
        except ValidationError as exc:
            raise CatalogError(_describe(label, exc)) from None
        if entry.name in seen:
            raise CatalogError(f"{label}: field 'name': duplicate of models[{seen[entry.name]}]")
        seen[entry.name] = i
        specs.append(entry.to_spec())
    return specs


def load_catalog(path: Path) -> list[ModelSpec]:
    """Read and validate a catalog file (``.json`` as JSON, anything else as YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text: {exc.reason}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: invalid YAML: {exc}") from None
    try:
        return parse_catalog(data)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None


def spec_to_entry(spec: ModelSpec) -> dict[str, Any]:
    """A ModelSpec in the catalog file's shape (memory in GiB): `parse_catalog` reads it back."""
    return {
        "name": spec.name,
        "engine": spec.engine,
        "source": spec.source,
        "engine_args": list(spec.engine_args),
        "weight_memory_gib": spec.weight_memory_bytes / GIB,
        "kv_memory_gib": spec.kv_memory_bytes / GIB,
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "allowed_gpu_types": list(spec.allowed_gpu_types),
        "tensor_parallel_options": list(spec.tensor_parallel_options),
        # a record written without access predates access rules: it was visible to everyone
        "access": {"public": spec.access.public or not spec.HasField("access"),
                   "allowed_owners": list(spec.access.allowed_owners)},
        "owner": spec.owner,
        "servers": list(spec.servers),
    }


def _entries(data: Any) -> Sequence[Any]:
    if isinstance(data, Mapping):
        extra = sorted(str(k) for k in data if k != "models")
        if extra:
            raise CatalogError(f"unknown top-level field(s) {', '.join(extra)}: expected only 'models'")
        data = data.get("models")
    if data is None:
        return []
    if not isinstance(data, list):
        raise CatalogError(f"'models' must be a list of model entries, got {type(data).__name__}")
    return data


def _label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f"model {name!r}" if isinstance(name, str) and name.strip() else f"models[{index}]"


def _describe(label: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not field and ":" in msg:
            # model-level validators put the field name in front of the message
            field, _, msg = msg.partition(":")
            msg = msg.strip()
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"field '{field}': {msg}" if field else msg)
    return f"{label}: " + "; ".join(problems)
