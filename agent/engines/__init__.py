"""Engine adapters by name. Each turns an EngineSpec into the exact process to run."""

from __future__ import annotations

from agent.engines.base import EngineAdapter, EngineConfigError, EngineLaunch, EngineSpec
from agent.engines.command import CommandAdapter
from agent.engines.sglang import SglangAdapter
from agent.engines.sim import SimAdapter
from agent.engines.vllm import VllmAdapter

ADAPTERS: dict[str, EngineAdapter] = {
    "sim": SimAdapter(), "vllm": VllmAdapter(), "sglang": SglangAdapter(), "command": CommandAdapter(),
}


def get_adapter(name: str) -> EngineAdapter:
    """The adapter called ``name``; EngineConfigError lists the known ones otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise EngineConfigError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ADAPTERS))}") from None


__all__ = ["ADAPTERS", "EngineAdapter", "EngineConfigError", "EngineLaunch", "EngineSpec", "get_adapter"]
