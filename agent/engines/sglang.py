"""The `sglang` engine adapter: ``python -m sglang.launch_server --model-path W …``.

Runs with the agent's own interpreter (``sys.executable``), so sglang must be installed in the
agent's environment. Tensor parallelism spans the instance's GPUs (``--tp-size``); extra
arguments come last.
"""

from __future__ import annotations

import sys

from agent.engines.base import EngineConfigError, EngineLaunch, EngineSpec, cuda_env
from agent.engines.vllm import option_args, tensor_parallel_size

SGLANG_OPTIONS = {"max_concurrency": "--max-running-requests"}


class SglangAdapter:
    """Builds the ``sglang.launch_server`` command line for one instance."""

    name = "sglang"

    def build(self, spec: EngineSpec) -> EngineLaunch:
        if not spec.weights:
            raise EngineConfigError("sglang needs a model or weights path")
        opts, max_concurrency = option_args(self.name, spec, SGLANG_OPTIONS)
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.weights,
                "--host", spec.host, "--port", str(spec.port), "--served-model-name", spec.model,
                "--tp-size", str(tensor_parallel_size(spec)), *opts, *spec.extra_args]
        return EngineLaunch(argv=tuple(argv), env=cuda_env(spec), max_concurrency=max_concurrency)
