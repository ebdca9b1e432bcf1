"""`ctl profile`: measure one running instance and write a throughput profile for the planner.

    for each mix (prefill-heavy, decode-heavy):
        C workers ── streaming chat requests back to back for duration/len(mixes) ──▶ MixResult
                     (requests finished, completion tokens from the usage chunk, TTFT)
    requests_per_s = the rate of a 50/50 mix of both: len(mixes) / sum(1 / rps_mix)
    ──▶ {model, gpu_type, tp, requests_per_s}   (exactly a snapshot `profiles` entry)
    ──▶ merged into a cluster/snapshot file's `profiles` list (same model, gpu_type, tp replaced)

A request that starts before the mix's deadline is allowed to finish, and rates are taken over
the time until the last one finished, so a long tail does not inflate the rate. Prompts are
synthetic words.

Before measuring, the prompts are sized to the engine (``fit_mixes``): its ``max_model_len``
from ``/v1/models`` and its tokens per synthetic word from ``/tokenize`` (vLLM's; the gateway
forwards it). A mix whose prompt + max_tokens would not fit is shrunk, and said so. A mix stops
after ``MAX_CLIENT_ERRORS`` requests in a row were refused with a 4xx (not 408/429): the request
itself is wrong for this instance and repeating it measures nothing.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controlplane.planner.snapshot import ThroughputProfile, read_data_file


class ProfileError(RuntimeError):
    """The instance could not be profiled (unreachable, every request failed) or the file not written."""


@dataclass(frozen=True)
class Mix:
    """One request shape: a prompt of about `prompt_words` tokens, `max_tokens` generated."""

    name: str
    prompt_words: int
    max_tokens: int


MAX_CLIENT_ERRORS = 5                 # 4xx in a row that stop a mix
CONTEXT_MARGIN_TOKENS = 8             # kept free below max_model_len (tokenizer differences, BOS)
FALLBACK_TOKENS_PER_WORD = 4.0        # when the engine cannot /tokenize: "w1234" is at most ~4 tokens
FALLBACK_CHAT_OVERHEAD = 32           # tokens a chat template adds around the prompt, when unknown
PREFILL_HEAVY = Mix("prefill-heavy", prompt_words=1024, max_tokens=16)
DECODE_HEAVY = Mix("decode-heavy", prompt_words=32, max_tokens=256)
DEFAULT_MIXES: tuple[Mix, ...] = (PREFILL_HEAVY, DECODE_HEAVY)


@dataclass
class MixResult:
    """What one mix measured."""

    mix: Mix
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    ttfts_s: list[float] = field(default_factory=list)
    last_error: str = ""
    client_errors_in_a_row: int = 0
    last_status: int = 0

    @property
    def stopped_by_client_errors(self) -> bool:
        """True when the mix gave up: the instance refused its requests MAX_CLIENT_ERRORS times in a row."""
        return self.client_errors_in_a_row >= MAX_CLIENT_ERRORS

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second."""
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second, all workers together."""
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return {"mix": self.mix.name, "prompt_words": self.mix.prompt_words, "max_tokens": self.mix.max_tokens,
                "requests": self.requests, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3),
                "requests_per_s": round(self.requests_per_s, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_p50_ms": round(1000 * statistics.median(self.ttfts_s), 1) if self.ttfts_s else None,
                "last_error": self.last_error}


@dataclass(frozen=True)
class ProfileResult:
    """Per-mix results and the profile entry they give."""

    entry: ThroughputProfile
    mixes: tuple[MixResult, ...]
    notes: tuple[str, ...] = ()       # what was adjusted to fit the engine

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return {"profile": self.entry.model_dump(), "mixes": [m.as_dict() for m in self.mixes],
                "notes": list(self.notes)}


def mixed_rps(rates: Sequence[float]) -> float:
    """Requests/s of an equal mix of request kinds served at `rates` each (harmonic mean)."""
    if not rates or any(r <= 0 for r in rates):
        return 0.0
    return len(rates) / sum(1 / r for r in rates)


def _prompt(words: int, worker: int, n: int) -> str:
    # vary the text so no engine-side prefix cache makes later requests free
    return " ".join(f"w{(worker * 7919 + n * 104729 + i) % 9973}" for i in range(max(1, words)))


async def _one_request(http: aiohttp.ClientSession, url: str, model: str, mix: Mix, prompt: str,
                       result: MixResult, headers: Mapping[str, str]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": mix.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    first: float | None = None
    chunks = 0
    usage: dict[str, Any] = {}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=dict(headers)) as resp:
        if resp.status != 200:
            result.errors += 1
            result.last_status = resp.status
            result.last_error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            refused = 400 <= resp.status < 500 and resp.status not in (408, 429)
            result.client_errors_in_a_row = result.client_errors_in_a_row + 1 if refused else 0
            return
        result.client_errors_in_a_row = 0
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
    result.requests += 1
    result.completion_tokens += int(usage.get("completion_tokens", chunks))
    result.prompt_tokens += int(usage.get("prompt_tokens", 0))
    if first is not None:
        result.ttfts_s.append(first - started)


async def run_mix(http: aiohttp.ClientSession, url: str, model: str, mix: Mix, *, concurrency: int,
                  duration_s: float, headers: Mapping[str, str] | None = None) -> MixResult:
    """Drive `concurrency` back-to-back streaming workers for `duration_s`; see the module docstring."""
    result = MixResult(mix)
    started = time.monotonic()
    deadline = started + duration_s
    last_done = started

    async def worker(w: int) -> None:
        nonlocal last_done
        n = 0
        while time.monotonic() < deadline and not result.stopped_by_client_errors:
            try:
                await _one_request(http, url, model, mix, _prompt(mix.prompt_words, w, n), result, headers or {})
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                result.errors += 1
                result.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.05)
            n += 1
            last_done = max(last_done, time.monotonic())

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    result.elapsed_s = last_done - started
    return result


async def profile_instance(url: str, model: str, gpu_type: str, tp: int, *, concurrency: int = 8,
                           duration_s: float = 20.0, mixes: Sequence[Mix] = DEFAULT_MIXES,
                           api_key: str = "", request_timeout_s: float = 300.0) -> ProfileResult:
    """Measure `model` at `url` with each mix for duration_s / len(mixes); ProfileError when nothing succeeded."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10)
    results = []
    base = url.rstrip("/")
    async with aiohttp.ClientSession(timeout=timeout) as http:
        fitted, notes = await fit_mixes(http, base, model, mixes, headers)
        for mix in fitted:
            result = await run_mix(http, base, model, mix, concurrency=concurrency,
                                   duration_s=duration_s / len(fitted), headers=headers)
            if result.stopped_by_client_errors:
                raise ProfileError(
                    f"{mix.name}: stopped after {result.client_errors_in_a_row} requests in a row were refused "
                    f"with HTTP {result.last_status} ({result.errors} refused in all); last answer: "
                    f"{result.last_error}. These requests do not suit this instance: if the prompt is too long "
                    "for the model, lower --prefill-prompt or --decode-tokens")
            results.append(result)
    failed = [r for r in results if r.requests == 0]
    if failed:
        raise ProfileError(f"{failed[0].mix.name}: no request succeeded ({failed[0].errors} errors; last: "
                           f"{failed[0].last_error or 'none'})")
    entry = ThroughputProfile(model=model, gpu_type=gpu_type, tp=tp,
                              requests_per_s=round(mixed_rps([r.requests_per_s for r in results]), 4))
    return ProfileResult(entry, tuple(results), tuple(notes))


async def _get_json(http: aiohttp.ClientSession, method: str, url: str, headers: Mapping[str, str],
                    body: dict[str, Any] | None = None) -> Any:
    """The JSON answer, or None when the call fails in any way (these probes are best effort)."""
    try:
        async with http.request(method, url, json=body, headers=dict(headers),
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def engine_max_model_len(http: aiohttp.ClientSession, url: str, model: str,
                               headers: Mapping[str, str]) -> int | None:
    """``max_model_len`` of ``model`` from ``/v1/models`` (vLLM's field; the gateway keeps it), or None."""
    body = await _get_json(http, "GET", f"{url}/v1/models", headers)
    cards = body.get("data") if isinstance(body, dict) else None
    for card in cards if isinstance(cards, list) else ():
        if isinstance(card, dict) and card.get("id") == model:
            length = card.get("max_model_len")
            return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None
    return None


async def _chat_tokens(http: aiohttp.ClientSession, url: str, model: str, words: int,
                       headers: Mapping[str, str]) -> int | None:
    # a prompt like the ones sent (worker 1's first: mostly 4-digit words; worker 0's are w0, w1, …)
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(words, 1, 1)}]}
    answer = await _get_json(http, "POST", f"{url}/tokenize", headers, body)
    count = answer.get("count") if isinstance(answer, dict) else None
    return count if isinstance(count, int) and count > 0 else None


def fitted_mix(mix: Mix, max_model_len: int, tokens_per_word: float, overhead: int) -> Mix:
    """``mix`` with max_tokens and then the prompt shrunk so that prompt + max_tokens fits ``max_model_len``."""
    room = max_model_len - CONTEXT_MARGIN_TOKENS - overhead
    max_tokens = max(1, min(mix.max_tokens, room // 2))
    words = max(1, min(mix.prompt_words, int((room - max_tokens) / max(tokens_per_word, 0.01))))
    return Mix(mix.name, words, max_tokens)


async def fit_mixes(http: aiohttp.ClientSession, url: str, model: str, mixes: Sequence[Mix],
                    headers: Mapping[str, str]) -> tuple[list[Mix], list[str]]:
    """The mixes sized to the engine's context (see the module docstring), and notes on what changed."""
    max_len = await engine_max_model_len(http, url, model, headers)
    if max_len is None:
        return list(mixes), []
    one, hundred = (await _chat_tokens(http, url, model, 1, headers),
                    await _chat_tokens(http, url, model, 101, headers))
    if one is not None and hundred is not None and hundred > one:
        # +10%: other workers' words tokenize a little differently from the sample's
        per_word, overhead = 1.1 * (hundred - one) / 100, max(0, one - 1)
    else:
        per_word, overhead = FALLBACK_TOKENS_PER_WORD, FALLBACK_CHAT_OVERHEAD
    fitted, notes = [], []
    for mix in mixes:
        new = fitted_mix(mix, max_len, per_word, overhead)
        if new != mix:
            notes.append(f"{mix.name}: prompt {mix.prompt_words} -> {new.prompt_words} words, max_tokens "
                         f"{mix.max_tokens} -> {new.max_tokens} to fit max_model_len {max_len} "
                         f"({per_word:.2f} tokens per word)")
        fitted.append(new)
    return fitted, notes


def merge_profile(path: Path, entry: ThroughputProfile) -> None:
    """Add `entry` to the `profiles` list of a YAML/JSON file (created if missing), replacing the entry
    with the same model, gpu_type and tp. Other keys are kept (YAML comments are not)."""
    data: dict[str, Any] = {}
    is_json = path.suffix.lower() == ".json"
    if path.exists():
        loaded = read_data_file(path, ProfileError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ProfileError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    profiles = data.get("profiles") or []
    if not isinstance(profiles, list):
        raise ProfileError(f"{path}: profiles: expected a list")
    same = (entry.model, entry.gpu_type, entry.tp)
    kept = [p for p in profiles if not (isinstance(p, dict) and (p.get("model"), p.get("gpu_type"), p.get("tp"))
                                         == same)]
    data["profiles"] = [*kept, entry.model_dump()]
    text = json.dumps(data, indent=2) + "\n" if is_json else yaml.safe_dump(data, sort_keys=False)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot write: {exc.strerror or exc}") from None
