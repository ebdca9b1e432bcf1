"""What an engine adapter is: a pure function from an EngineSpec to the exact process to run.

Adapters never start processes themselves (agent/supervisor.py does), so their command lines
are tested exactly, without GPUs. Arguments are always lists: never a string split on spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class EngineConfigError(ValueError):
    """The engine cannot be built from what was given (bad template, missing GPUs, …)."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything an adapter needs to build the command for one model instance."""

    model: str                                  # served model name (what clients send as "model")
    port: int
    host: str = "127.0.0.1"
    source: str = ""                            # weights path / HF id; empty = same as model
    gpu_indices: tuple[int, ...] = ()           # GPUs given to this instance (CUDA_VISIBLE_DEVICES)
    extra_args: tuple[str, ...] = ()            # user's extra engine arguments, appended verbatim
    template: tuple[str, ...] = ()              # `command` engine: argv template with {port} {model} {gpus} …
    options: dict[str, str] = field(default_factory=dict)  # engine-specific knobs (sim latency, …)

    @property
    def weights(self) -> str:
        """The weights to load: ``source`` when given, else the served name."""
        return self.source or self.model


@dataclass(frozen=True)
class EngineLaunch:
    """The exact process to start: argv (a list), extra environment, and how to probe it."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    models_path: str = "/v1/models"
    max_concurrency: int = 0                    # 0 = unknown


class EngineAdapter(Protocol):
    """Builds the launch for one engine kind; see agent/engines/__init__.py for the registry."""

    name: str

    def build(self, spec: EngineSpec) -> EngineLaunch:
        """Return the exact process to run for ``spec``; raise EngineConfigError when impossible."""
        ...


def cuda_env(spec: EngineSpec) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the instance's GPUs (empty dict when none were given).

    Indices are NVML's, which number GPUs by PCI bus; CUDA's default order is fastest-first, so
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes the engine see the same cards on mixed-GPU nodes.
    """
    if not spec.gpu_indices:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in spec.gpu_indices)}
