"""The sim engine as a real subprocess on a free port, driven by the official `openai` client and raw aiohttp.

One shared engine (module scope) serves the protocol tests; tests that need special flags or that
break the process (crash, hang, faults, concurrency limit, startup delay) start their own engine.
Timing assertions are mostly lower bounds: a noisy CI machine can only make things slower.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from controlplane.netutil import free_port
from controlplane.procs import spawn, stop

MODEL = "sim-test-model"
EMBED_DIM = 32
TTFT_MS = 80.0
TOKENS_PER_S = 100.0
START_TIMEOUT_S = 20.0


@dataclass
class Sim:
    """A running sim engine subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _spawn_sim(log_path: Path, *flags: str) -> Sim:
    port = free_port()
    argv = [sys.executable, "-m", "agent.sim", "--model", MODEL, "--port", str(port), *flags]
    return Sim(spawn(argv, log_path), port, log_path)


def _wait_healthy(sim: Sim, timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll /health until it answers 200; returns the seconds waited. Fails if the process exits."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if sim.proc.poll() is not None:
            pytest.fail(f"sim exited with {sim.proc.returncode} before serving:\n{sim.log()}")
        if _health_ok(sim.url):
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"sim did not answer /health within {timeout_s}s:\n{sim.log()}")


@contextmanager
def running_sim(log_path: Path, *flags: str) -> Iterator[Sim]:
    """Start a sim engine with ``flags``, wait until healthy, stop it afterwards."""
    sim = _spawn_sim(log_path, *flags)
    try:
        _wait_healthy(sim)
        yield sim
    finally:
        stop(sim.proc, timeout=5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    """The shared engine: known ttft, token rate and embedding size, no faults."""
    log_path = tmp_path_factory.mktemp("sim") / "sim.log"
    with running_sim(log_path, "--ttft-ms", str(TTFT_MS), "--tokens-per-s", str(TOKENS_PER_S),
                     "--embedding-dim", str(EMBED_DIM), "--seed", "7") as s:
        yield s


StartSim = Callable[..., Sim]


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[StartSim]:
    """Factory for per-test engines with their own flags; all are stopped at teardown."""
    started: list[Sim] = []

    def start(*flags: str, wait: bool = True) -> Sim:
        s = _spawn_sim(tmp_path / f"sim-{len(started)}.log", *flags)
        started.append(s)
        if wait:
            _wait_healthy(s)
        return s

    yield start
    for s in started:
        stop(s.proc, timeout=5)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client_for(sim: Sim, **kwargs: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, **kwargs)


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[AsyncOpenAI]:
    c = client_for(sim)
    yield c
    await c.close()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample on /metrics by name (labels ignored: one model per engine)."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if "le" not in s.labels and "finished_reason" not in s.labels}


def sse_events(raw: bytes) -> list[str]:
    """Split a raw SSE body into event payloads, checking each is one ``data: `` line."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    events = raw.decode().split("\n\n")[:-1]
    for ev in events:
        assert ev.startswith("data: ") and "\n" not in ev, ev
    return [ev[len("data: "):] for ev in events]


# -- protocol --------------------------------------------------------------------------------------


async def test_models_lists_the_one_model(client: AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    assert page.data[0].object == "model"


async def test_chat_non_streaming_usage_and_length(client: AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "you are terse"},
                {"role": "user", "content": "name three colours please"}]
    resp = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)  # type: ignore[arg-type]
    assert resp.model == MODEL and resp.object == "chat.completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content is not None and len(choice.message.content.split()) == 7
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 3 + 4  # whitespace-separated words of every message
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_chat_without_max_tokens_stops_within_default(client: AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 64
    content = resp.choices[0].message.content
    assert content is not None and len(content.split()) == resp.usage.completion_tokens


async def test_completions_non_streaming(client: AsyncOpenAI) -> None:
    resp = await client.completions.create(model=MODEL, prompt="one two three four five", max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"
    assert len(resp.choices[0].text.split()) == 5
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (5, 5, 10)


async def test_same_request_same_text(client: AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "determinism please", "max_tokens": 6}
    a, b = await client.completions.create(**kwargs), await client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text
    assert a.id != b.id


async def test_n_2_gives_two_choices_and_counts_both(client: AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "two please"}],
                                                max_tokens=4, n=2)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    for c in resp.choices:
        assert c.message.content is not None and len(c.message.content.split()) == 4
        assert c.finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


async def test_chat_streaming_with_usage_via_openai(client: AsyncOpenAI) -> None:
    n_tokens = 6
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream me"}], max_tokens=n_tokens, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert not first.choices[0].delta.content
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == n_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, n_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_chat_streaming_raw_framing(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "frame it"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(p["choices"][0]["delta"]["content"] for p in payloads[1:4])
    assert len(payloads) == 1 + 3 + 1 + 1  # role, tokens, finish, usage
    assert payloads[4]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


async def test_streaming_without_include_usage_has_no_usage_chunk(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
    payloads = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert all("usage" not in p and p["choices"] for p in payloads)
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_completions_streaming(client: AsyncOpenAI, sim: Sim, http: aiohttp.ClientSession) -> None:
    stream = await client.completions.create(model=MODEL, prompt="count to five", max_tokens=5, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 5 and all(texts)
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None] * 4 + ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    # Streamed text equals the non-streamed answer to the same request.
    whole = await client.completions.create(model=MODEL, prompt="count to five", max_tokens=5)
    assert "".join(texts) == whole.choices[0].text
    async with http.post(sim.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "count", "max_tokens": 2, "stream": True}) as resp:
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len(sse_events(raw)) == 2 + 1


# -- embeddings ------------------------------------------------------------------------------------


async def test_embeddings_float_unit_norm_deterministic(client: AsyncOpenAI) -> None:
    resp = await client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"], encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1]
    a, b = resp.data[0].embedding, resp.data[1].embedding
    assert len(a) == len(b) == EMBED_DIM
    assert math.isclose(math.fsum(v * v for v in a), 1.0, rel_tol=1e-6)
    assert math.isclose(math.fsum(v * v for v in b), 1.0, rel_tol=1e-6)
    assert a != b
    assert resp.usage.prompt_tokens == 3
    again = await client.embeddings.create(model=MODEL, input="alpha beta", encoding_format="float")
    assert again.data[0].embedding == a


async def test_embeddings_base64_matches_float(client: AsyncOpenAI, sim: Sim, http: aiohttp.ClientSession) -> None:
    floats = (await client.embeddings.create(model=MODEL, input="delta", encoding_format="float")).data[0].embedding
    # The openai client asks for base64 by default and decodes it itself.
    decoded_by_client = (await client.embeddings.create(model=MODEL, input="delta")).data[0].embedding
    async with http.post(sim.url + "/v1/embeddings",
                         json={"model": MODEL, "input": "delta", "encoding_format": "base64"}) as resp:
        assert resp.status == 200
        item = (await resp.json())["data"][0]["embedding"]
    assert isinstance(item, str)
    raw = base64.b64decode(item)
    assert len(raw) == 4 * EMBED_DIM
    vec = struct.unpack(f"<{EMBED_DIM}f", raw)
    for got in (vec, decoded_by_client):
        assert len(got) == EMBED_DIM
        assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(got, floats, strict=True))


# -- errors ----------------------------------------------------------------------------------------


def assert_envelope(body: dict[str, Any], status: int, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param


async def test_unknown_model_is_404(client: AsyncOpenAI, sim: Sim, http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    async with http.post(sim.url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as resp:
        assert resp.status == 404
        assert_envelope(await resp.json(), 404, "model")


async def test_bad_json_is_400(sim: Sim, http: aiohttp.ClientSession) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        async with http.post(sim.url + path, data=b"{not json",
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, path
            body = await resp.json()
        assert_envelope(body, 400)
        assert "JSON" in body["error"]["message"]
    async with http.post(sim.url + "/v1/completions", json=["a", "list"]) as resp:
        assert resp.status == 400
        assert_envelope(await resp.json(), 400)


@pytest.mark.parametrize("max_tokens", [0, -3, "5", 2.5, True, 10_000])
async def test_bad_max_tokens_is_400(sim: Sim, http: aiohttp.ClientSession, max_tokens: object) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens}
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 400
        assert_envelope(await resp.json(), 400, "max_tokens")


async def test_bad_max_tokens_via_openai_is_bad_request(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="x", max_tokens=0)


# -- metrics and timing ----------------------------------------------------------------------------


async def test_metrics_names_and_counts(client: AsyncOpenAI, sim: Sim, http: aiohttp.ClientSession) -> None:
    before = await scrape(http, sim.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count"):
        assert name in before, sorted(before)
    assert before["vllm:num_requests_running"] == 0 and before["vllm:num_requests_waiting"] == 0
    await client.completions.create(model=MODEL, prompt="metrics", max_tokens=9)
    after = await scrape(http, sim.url)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 9
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 1
    ttft_sum = after["vllm:time_to_first_token_seconds_sum"] - before["vllm:time_to_first_token_seconds_sum"]
    assert ttft_sum >= TTFT_MS / 1000 * 0.9


async def test_ttft_and_token_rate_are_respected(sim: Sim, http: aiohttp.ClientSession) -> None:
    n = 21
    body = {"model": MODEL, "prompt": "time me", "max_tokens": n, "stream": True}
    arrivals: list[float] = []
    started = time.monotonic()
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event != b"data: [DONE]":
                    arrivals.append(time.monotonic())
    assert len(arrivals) == n
    ttft = arrivals[0] - started
    span = arrivals[-1] - arrivals[0]
    expected_span = (n - 1) / TOKENS_PER_S
    assert ttft >= TTFT_MS / 1000 * 0.9, ttft
    assert span >= expected_span * 0.9, span
    assert ttft + span < 10 * (TTFT_MS / 1000 + expected_span)  # generous: noisy CI

    started = time.monotonic()
    async with http.post(sim.url + "/v1/completions", json={**body, "stream": False}) as resp:
        assert resp.status == 200
        await resp.read()
    assert time.monotonic() - started >= (TTFT_MS / 1000 + expected_span) * 0.9


# -- per-test engines: concurrency, faults, process lifecycle --------------------------------------


async def test_max_concurrency_1_queues_the_second_request(start_sim: StartSim,
                                                           http: aiohttp.ClientSession) -> None:
    s = start_sim("--max-concurrency", "1", "--ttft-ms", "10", "--tokens-per-s", "20")
    body = {"model": MODEL, "prompt": "slow", "max_tokens": 12, "stream": True}  # ~0.56 s each
    done: dict[str, float] = {}

    async def run(name: str, first_byte: asyncio.Event | None = None) -> None:
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readany()
            if first_byte:
                first_byte.set()
            await resp.read()
        done[name] = time.monotonic()

    first_started = asyncio.Event()
    a = asyncio.create_task(run("a", first_started))
    await asyncio.wait_for(first_started.wait(), 10)
    b = asyncio.create_task(run("b"))
    seen_waiting = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not a.done():
        m = await scrape(http, s.url)
        if m["vllm:num_requests_waiting"] == 1:
            assert m["vllm:num_requests_running"] == 1
            seen_waiting = True
            break
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(a, b), 20)
    assert seen_waiting, "the second request never showed up as waiting"
    # b could start generating only after a finished: at least its whole generation time later.
    assert done["b"] - done["a"] >= (0.01 + 11 / 20) * 0.9
    m = await scrape(http, s.url)
    assert (m["vllm:num_requests_waiting"], m["vllm:num_requests_running"]) == (0, 0)


async def test_error_rate_1_answers_500_and_stays_healthy(start_sim: StartSim) -> None:
    s = start_sim("--error-rate", "1")
    async with client_for(s) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 500
        body = info.value.body
        assert isinstance(body, dict) and body.get("code") == 500  # the client unwraps {"error": ...}
        models = await c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert _health_ok(s.url)


async def test_faults_endpoint_changes_error_rate_at_run_time(start_sim: StartSim,
                                                              http: aiohttp.ClientSession) -> None:
    s = start_sim("--ttft-ms", "0")
    req = {"model": MODEL, "prompt": "x", "max_tokens": 1}

    async def status() -> int:
        async with http.post(s.url + "/v1/completions", json=req) as resp:
            return resp.status

    assert await status() == 200
    async with http.post(s.url + "/sim/faults", json={"error_rate": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["error_rate"] == 1.0
    assert [await status() for _ in range(3)] == [500, 500, 500]
    async with http.post(s.url + "/sim/faults", json={"error_rate": 0}) as resp:
        assert resp.status == 200
    assert await status() == 200
    async with http.post(s.url + "/sim/faults", json={"colour": "blue"}) as resp:
        assert resp.status == 400
        assert_envelope(await resp.json(), 400)
    async with http.post(s.url + "/sim/faults", json={"error_rate": 2}) as resp:
        assert resp.status == 400
        assert "error_rate" in (await resp.json())["error"]["message"]


async def test_rejected_fault_update_leaves_config_unchanged(start_sim: StartSim,
                                                             http: aiohttp.ClientSession) -> None:
    s = start_sim("--ttft-ms", "0")
    for bad in ({"error_rate": 2}, {"error_rate": "lots"}, {"error_rate": None}, {"hang_rate": 1, "error_rate": -1}):
        async with http.post(s.url + "/sim/faults", json=bad) as resp:
            assert resp.status == 400, bad
            assert_envelope(await resp.json(), 400)
    async with http.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.status == 200  # neither the bad error_rate nor the hang_rate of a rejected batch stuck


async def test_hang_rate_1_times_out_client_side_and_health_still_answers(start_sim: StartSim,
                                                                         http: aiohttp.ClientSession) -> None:
    s = start_sim("--hang-rate", "1")
    started = time.monotonic()
    async with client_for(s, timeout=0.5) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert time.monotonic() - started < 5
    with pytest.raises(TimeoutError):
        async with http.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                             timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
            await resp.read()
    async with http.get(s.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
        assert resp.status == 200
    m = await scrape(http, s.url)
    assert m["vllm:num_requests_running"] == 0  # hung requests never took a generation slot
    assert s.proc.poll() is None


async def test_crash_after_1_exits_70_on_the_second_request(start_sim: StartSim) -> None:
    s = start_sim("--crash-after", "1", "--ttft-ms", "0")
    async with client_for(s) as c:
        first = await c.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert first.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIConnectionError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert s.proc.wait(timeout=10) == 70


async def test_startup_delay_keeps_the_port_closed(start_sim: StartSim) -> None:
    delay = 1.5
    s = start_sim("--startup-delay-s", str(delay), wait=False)
    waited = await asyncio.to_thread(_wait_healthy, s)
    assert waited >= delay, waited


@pytest.mark.parametrize("flags, field", [
    (("--error-rate", "2"), "error_rate"),
    (("--hang-rate", "-0.5"), "hang_rate"),
    (("--max-concurrency", "0"), "max_concurrency"),
    (("--tokens-per-s", "fast"), "tokens-per-s"),
])
def test_bad_flags_exit_2(start_sim: StartSim, flags: tuple[str, ...], field: str) -> None:
    s = start_sim(*flags, wait=False)
    assert s.proc.wait(timeout=20) == 2
    assert field in s.log()
    assert not _health_ok(s.url)


# -- /v1/responses, /v1/rerank, /v1/score -----------------------------------------------------------


def sse_named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split a Responses API stream into (event name, data) pairs, checking the two-line framing."""
    assert raw.endswith(b"\n\n") and b"[DONE]" not in raw, raw[-60:]
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        out.append((name_line[len("event: "):], json.loads(data_line[len("data: "):])))
    return out


async def test_responses_non_streaming_shape_and_usage(client: AsyncOpenAI, sim: Sim,
                                                       http: aiohttp.ClientSession) -> None:
    resp = await client.responses.create(model=MODEL, input="tell me about pools", max_output_tokens=6)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == MODEL
    # as vLLM: cut by max_output_tokens → incomplete, with the reason
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    (part,) = item.content
    assert part.type == "output_text" and len(part.text.split()) == 6 and resp.output_text == part.text
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (4, 6, 10)
    # messages + instructions count as the prompt; without a cap the answer stops by itself
    body = {"model": MODEL, "instructions": "be brief", "input": [
        {"role": "user", "content": "one two"}, {"role": "user", "content": [{"type": "input_text", "text": "three"}]}]}
    async with http.post(sim.url + "/v1/responses", json=body) as r:
        assert r.status == 200
        raw = await r.json()
    assert raw["status"] == "completed" and raw["incomplete_details"] is None
    text = raw["output"][0]["content"][0]["text"]
    assert raw["usage"]["input_tokens"] == 2 + 2 + 1
    assert 1 <= raw["usage"]["output_tokens"] <= 64 and len(text.split()) == raw["usage"]["output_tokens"]


async def test_responses_streaming_via_openai_matches_non_streaming(client: AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "stream a response", "max_output_tokens": 5}
    whole = await client.responses.create(**kwargs)
    stream = await client.responses.create(**kwargs, stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 5, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    created, final = events[0], events[-1]
    assert created.type == "response.created" and created.response.status == "in_progress"
    assert created.response.usage is None and created.response.output == []
    assert final.type == "response.completed" and final.response.output_text == whole.output_text
    assert final.response.id == created.response.id != whole.id
    assert final.response.usage is not None and final.response.usage.output_tokens == 5
    item_ids = {getattr(e, "item_id", None) for e in events} - {None}
    assert item_ids == {final.response.output[0].id}
    # the SDK's stream helper accumulates the same text
    async with client.responses.stream(**kwargs) as helper:
        async for _ in helper:
            pass
        assert (await helper.get_final_response()).output_text == whole.output_text


async def test_responses_stream_framing_and_ttft(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "input": "time the first token", "max_output_tokens": 3, "stream": True}
    arrivals: dict[str, float] = {}
    raw = b""
    async with http.post(sim.url + "/v1/responses", json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in resp.content.iter_any():
            raw += chunk
            for name in (b"response.created", b"response.output_text.delta"):
                if name in raw and name.decode() not in arrivals:
                    arrivals[name.decode()] = time.monotonic()
    events = sse_named_events(raw)
    assert all(name == data["type"] for name, data in events)
    assert arrivals["response.output_text.delta"] - arrivals["response.created"] >= TTFT_MS / 1000 * 0.9


async def test_responses_errors(client: AsyncOpenAI, sim: Sim, http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="nope", input="x")
    for body, param in (({"model": MODEL}, "input"), ({"model": MODEL, "input": ""}, "input"),
                        ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
                        ({"model": MODEL, "input": "x", "instructions": 3}, "instructions")):
        async with http.post(sim.url + "/v1/responses", json=body) as resp:
            assert resp.status == 400, body
            assert_envelope(await resp.json(), 400, param)


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def test_rerank_orders_by_relevance_and_agrees_with_score(sim: Sim, http: aiohttp.ClientSession) -> None:
    docs: list[str | dict[str, str]] = ["gpus join the pool", "tell me about pools", {"text": "queues and planners"},
                                        "tokens stream back"]
    body = {"model": MODEL, "query": "tell me about pools", "documents": docs}
    status, full = await post_json(http, sim.url + "/v1/rerank", body)
    assert status == 200 and full["model"] == MODEL
    results = full["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert results[0] == {"index": 1, "document": {"text": "tell me about pools"}, "relevance_score": 1.0}
    assert {r["index"]: r["document"]["text"] for r in results}[2] == "queues and planners"
    words = [len(d.split()) if isinstance(d, str) else 3 for d in docs]
    assert full["usage"] == {"prompt_tokens": 4 * 4 + sum(words), "total_tokens": 4 * 4 + sum(words)}
    # top_n keeps the best n; the same request gives the same scores (another path, same engine)
    status, top = await post_json(http, sim.url + "/rerank", {**body, "top_n": 2})
    assert status == 200 and top["results"] == results[:2]
    # /v1/score of the same pairs gives the same numbers
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    status, scored = await post_json(http, sim.url + "/v1/score",
                                     {"model": MODEL, "text_1": body["query"], "text_2": texts})
    assert status == 200
    assert {d["index"]: d["score"] for d in scored["data"]} == {r["index"]: r["relevance_score"] for r in results}


async def test_score_pairs_broadcast_and_symmetry(sim: Sim, http: aiohttp.ClientSession) -> None:
    status, pairwise = await post_json(http, sim.url + "/v1/score",
                                       {"model": MODEL, "text_1": ["a b", "c"], "text_2": ["c", "a b"]})
    assert status == 200 and pairwise["object"] == "list" and pairwise["model"] == MODEL
    assert [(d["index"], d["object"]) for d in pairwise["data"]] == [(0, "score"), (1, "score")]
    assert pairwise["data"][0]["score"] == pairwise["data"][1]["score"]  # score(x, y) == score(y, x)
    assert pairwise["usage"]["prompt_tokens"] == 6 and pairwise["usage"]["completion_tokens"] == 0
    status, single = await post_json(http, sim.url + "/score", {"model": MODEL, "text_1": "c", "text_2": "c"})
    assert status == 200 and [d["score"] for d in single["data"]] == [1.0]
    before = await scrape(http, sim.url)
    status, err = await post_json(http, sim.url + "/v1/score",
                                  {"model": MODEL, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]})
    assert status == 400
    assert_envelope(err, 400, "text_2")
    assert (await scrape(http, sim.url))["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": [3]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/v1/score", {"text_1": "a"}, "text_2"),
    ("/v1/score", {"text_1": [1], "text_2": "a"}, "text_1"),
])
async def test_rerank_and_score_bad_input_is_400(sim: Sim, http: aiohttp.ClientSession, path: str,
                                                 body: dict[str, Any], param: str) -> None:
    status, err = await post_json(http, sim.url + path, {"model": MODEL, **body})
    assert status == 400
    assert_envelope(err, 400, param)


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": "x"}),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/v1/score", {"text_1": "a", "text_2": "b"}),
])
async def test_new_routes_unknown_model_is_404(sim: Sim, http: aiohttp.ClientSession, path: str,
                                               body: dict[str, Any]) -> None:
    status, err = await post_json(http, sim.url + path, {"model": "nope", **body})
    assert status == 404
    assert_envelope(err, 404, "model")
    assert err["error"]["type"] == "NotFoundError"
