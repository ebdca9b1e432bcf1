"""`ctl profile` against an engine with a short context: prompts sized to its max_model_len, and a
clear stop (not hundreds of failing requests) when the instance refuses every request."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from controlplane.planner.profile import MAX_CLIENT_ERRORS, Mix, fitted_mix
from tests.cluster import CTL, Sim


def _profile(url: str, model: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "profile", "--url", url, "--model", model, "--gpu-type", "SIM-24GB", "--tp", "1",
                           "--concurrency", "2", "--duration", "2", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_fitted_mix_keeps_prompt_plus_max_tokens_inside_the_context() -> None:
    assert fitted_mix(Mix("p", 1024, 16), 8192, 1.0, 10) == Mix("p", 1024, 16)  # fits: unchanged
    small = fitted_mix(Mix("p", 1024, 16), 1024, 3.0, 10)
    assert small.max_tokens == 16 and small.prompt_words * 3.0 + 16 + 10 <= 1024 - 8
    decode = fitted_mix(Mix("d", 32, 4096), 1024, 1.0, 10)
    assert decode.max_tokens <= 503 and decode.prompt_words + decode.max_tokens + 10 <= 1024 - 8


def test_profile_sizes_the_prompt_to_a_short_context(tmp_path: Path) -> None:
    # the default prefill prompt (1024 words) does not fit 512 tokens: without fitting, every request is a 400
    sim = Sim("short-ctx", tmp_path, "--max-model-len", "512", "--tokens-per-s", "0", "--ttft-ms", "1")
    try:
        out = _profile(sim.url, "short-ctx")
    finally:
        sim.stop()
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert all(m["errors"] == 0 and m["requests"] > 0 for m in result["mixes"]), result["mixes"]
    prefill = next(m for m in result["mixes"] if m["mix"] == "prefill-heavy")
    assert prefill["prompt_words"] < 512 and prefill["prompt_tokens"] > 0
    assert any("prefill-heavy: prompt 1024 ->" in n and "max_model_len 512" in n for n in result["notes"])


def test_profile_stops_after_repeated_client_errors_with_a_clear_message(tmp_path: Path) -> None:
    sim = Sim("served", tmp_path, "--tokens-per-s", "0", "--ttft-ms", "1")
    try:
        started = time.monotonic()
        out = _profile(sim.url, "not-served", "--duration", "20")
        elapsed = time.monotonic() - started
    finally:
        sim.stop()
    assert out.returncode == 255
    assert f"stopped after {MAX_CLIENT_ERRORS}" in out.stderr or f"stopped after {MAX_CLIENT_ERRORS + 1}" in out.stderr
    assert "HTTP 404" in out.stderr and "does not exist" in out.stderr
    assert elapsed < 10  # gave up at once instead of firing requests for the whole --duration
