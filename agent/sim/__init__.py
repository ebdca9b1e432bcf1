"""The `sim` engine: a real OpenAI/vLLM-compatible HTTP server with simulated generation.

It stands in for GPUs in CI, benchmarks and `ctl dev`: same routes, same SSE framing, same
metric names as vLLM, with configurable time to first token, token rate, concurrency limit and
injected faults. Run it with ``python -m agent.sim --model NAME --port PORT``.
"""

from agent.sim.server import SimConfig, build_app

__all__ = ["SimConfig", "build_app"]
