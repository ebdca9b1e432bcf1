"""The `sim` engine adapter: runs agent.sim (a real OpenAI-compatible HTTP server, no GPU)."""

from __future__ import annotations

import sys

from agent.engines.base import EngineConfigError, EngineLaunch, EngineSpec

# Options accepted in EngineSpec.options, mapped to agent.sim flags.
SIM_OPTIONS = {
    "ttft_ms": "--ttft-ms",
    "tokens_per_s": "--tokens-per-s",
    "max_concurrency": "--max-concurrency",
    "error_rate": "--error-rate",
    "hang_rate": "--hang-rate",
    "crash_after": "--crash-after",
    "startup_delay_s": "--startup-delay-s",
    "max_tokens_default": "--max-tokens-default",
    "seed": "--seed",
    "max_model_len": "--max-model-len",
}


class SimAdapter:
    """Builds `python -m agent.sim --model M --port P …` from the spec's options."""

    name = "sim"

    def build(self, spec: EngineSpec) -> EngineLaunch:
        argv = [sys.executable, "-m", "agent.sim", "--model", spec.model, "--host", spec.host,
                "--port", str(spec.port)]
        for key, value in sorted(spec.options.items()):
            flag = SIM_OPTIONS.get(key)
            if flag is None:
                raise EngineConfigError(f"unknown sim option {key!r}; known: {', '.join(sorted(SIM_OPTIONS))}")
            argv += [flag, str(value)]
        argv += list(spec.extra_args)
        max_conc = int(spec.options.get("max_concurrency", "0") or 0)
        return EngineLaunch(argv=tuple(argv), max_concurrency=max_conc)
