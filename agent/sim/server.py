"""The sim engine's HTTP server: vLLM's OpenAI routes, SSE framing and metric names.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming
and not; ``stream_options`` as vLLM reads it: ``include_usage`` adds a final usage event and
``continuous_usage_stats`` a running ``usage`` on every event, both lax booleans, anything else
a 400), ``POST /v1/responses`` (streaming and not, events in
vLLM's order), ``POST /v1/embeddings``, ``POST /v1/rerank`` (also ``/rerank``,
``/v2/rerank``), ``POST /v1/score`` (also ``/score``), ``POST /tokenize``, ``POST /detokenize``,
``GET /health``, ``GET /version``, ``GET /metrics``, and ``POST /sim/faults`` to change fault
injection at run time (tests use it to make a live instance misbehave).

Generation is simulated: after ``ttft_ms`` the first token is sent, then one token every
``1/tokens_per_s`` seconds. With ``max_tokens`` the answer is exactly that long and ends with
``finish_reason: "length"``; without it the length is drawn from the prompt (up to
``max_tokens_default``) and ends with ``"stop"``. At most ``max_concurrency`` requests generate
at once; the rest wait (``vllm:num_requests_waiting``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields, replace
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.sim.responses import ResponseDraft, ResponseEvents
from agent.sim.text import count_tokens, embedding, prompt_text, relevance, seed_for, token_stream

MAX_MODEL_LEN = 8192
CRASH_EXIT_CODE = 70


@dataclass
class SimConfig:
    """How the simulated engine behaves; every field is also a command-line flag."""

    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 8000
    ttft_ms: float = 20.0
    tokens_per_s: float = 100.0          # 0 = as fast as possible
    max_concurrency: int = 64            # requests generating at once; the rest queue
    error_rate: float = 0.0              # fraction of requests answered 500 before any byte
    hang_rate: float = 0.0               # fraction of requests that never answer
    crash_after: int = 0                 # exit (code 70) when request N+1 arrives; 0 = never
    startup_delay_s: float = 0.0         # seconds before the port opens (model loading)
    max_tokens_default: int = 64         # longest answer when the request sets no max_tokens
    embedding_dim: int = 64
    seed: int = 0
    max_model_len: int = MAX_MODEL_LEN   # prompt + max_tokens longer than this is answered 400, as vLLM does

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("ttft_ms", "tokens_per_s", "startup_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("error_rate", "hang_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_tokens_default < 1 or self.embedding_dim < 1 or self.crash_after < 0 or self.max_model_len < 1:
            raise ValueError("max_tokens_default, embedding_dim and max_model_len must be >= 1, crash_after >= 0")


class ApiError(Exception):
    """An error answered in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status)


class Metrics:
    """vLLM's metric names, on a registry of our own."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating now", labels, registry=r).labels(model)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued", labels, registry=r).labels(model)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels, registry=r).labels(model)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels,
                                         registry=r).labels(model)
        self._success = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"],
                                registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              registry=r).labels(model)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency", labels, registry=r).labels(model)
        # vLLM's KV-cache gauge (0..1); here the share of generation slots in use
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full)", labels,
                                    registry=r).labels(model)
        self.model = model

    def success(self, reason: str) -> None:
        self._success.labels(self.model, reason).inc()


@dataclass
class Generation:
    """One request's parsed generation parameters."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    n: int
    seed: int


class SimEngine:
    """Request handlers and shared state of one simulated engine."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.metrics = Metrics(config.model)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.requests_seen = 0
        self.created = int(time.time())
        self.rng = random.Random(config.seed or None)

    # -- routes --------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/version", self.version),
            web.get("/metrics", self.prometheus),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/responses", self.responses),
            web.post("/v1/embeddings", self.embeddings),
            *(web.post(path, self.rerank) for path in ("/rerank", "/v1/rerank", "/v2/rerank")),
            *(web.post(path, self.score) for path in ("/score", "/v1/score")),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.post("/sim/faults", self.set_faults),
        ]

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": "sim"})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, _: web.Request) -> web.Response:
        card = {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": self.config.model, "parent": None, "max_model_len": self.config.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
        except ApiError as err:
            return err.response()
        allowed = {"error_rate", "hang_rate", "crash_after", "ttft_ms", "tokens_per_s"}
        unknown = set(body) - allowed
        if unknown:
            return ApiError(400, f"unknown fault fields {sorted(unknown)}; allowed: {sorted(allowed)}").response()
        types = {f.name: f.type for f in fields(SimConfig)}
        try:
            updates: dict[str, Any] = {k: int(v) if types[k] == "int" else float(v) for k, v in body.items()}
            replace(self.config, **updates).validate()  # check on a copy: a rejected update changes nothing
        except (TypeError, ValueError) as exc:
            return ApiError(400, f"bad fault update: {exc}").response()
        for key, value in updates.items():
            setattr(self.config, key, value)
        return web.json_response({k: getattr(self.config, k) for k in sorted(allowed)})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._admit(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", param="messages")
            gen = self._generation(body, prompt_text(messages), ("max_tokens", "max_completion_tokens"))
        except ApiError as err:
            return err.response()
        return await self._generate(request, body, gen, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._admit(request)
            prompt = body.get("prompt")
            if prompt is None or prompt == "" or prompt == []:
                raise ApiError(400, "'prompt' is required", param="prompt")
            gen = self._generation(body, prompt_text(prompt), ("max_tokens",))
        except ApiError as err:
            return err.response()
        return await self._generate(request, body, gen, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await self._admit(request)
            raw = body.get("input")
            items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
            if raw is None or raw == "" or raw == [] or not all(isinstance(i, (str, list)) for i in items):
                raise ApiError(400, "'input' must be a string, a list of strings or of token lists", param="input")
            if body.get("encoding_format", "float") not in ("float", "base64"):
                raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        except ApiError as err:
            return err.response()
        texts = [prompt_text(i) for i in items]
        prompt_tokens = sum(count_tokens(t) for t in texts)
        async with self._slot():
            await asyncio.sleep(self.config.ttft_ms / 1000)
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": i, "embedding": embedding(t, self.config.embedding_dim)}
            for i, t in enumerate(texts)]
        if body.get("encoding_format") == "base64":
            import base64
            import struct
            for item in data:
                vec = item["embedding"]
                item["embedding"] = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.success("stop")
        return web.json_response({
            "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": self.config.model, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
        })

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: ``input`` (text or messages), ``instructions``, ``max_output_tokens``."""
        try:
            body = await self._admit(request)
            raw = body.get("input")
            if not raw or not isinstance(raw, (str, list)):
                raise ApiError(400, "'input' must be a non-empty string or list of input items", param="input")
            instructions = body.get("instructions")
            if instructions is not None and not isinstance(instructions, str):
                raise ApiError(400, "'instructions' must be a string", param="instructions")
            # one output per request: the Responses API has no ``n``
            gen = self._generation({k: v for k, v in body.items() if k != "n"},
                                   prompt_text([instructions, raw]), ("max_output_tokens",))
        except ApiError as err:
            return err.response()
        started = time.monotonic()
        draft = ResponseDraft(f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time()),
                              self.config.model, body, gen, token_stream(gen.seed, gen.completion_tokens))
        async with self._slot():
            self.metrics.prompt_tokens.inc(gen.prompt_tokens)
            if not body.get("stream"):
                await asyncio.sleep(self._duration(gen.completion_tokens))
                self._finish(gen, started, started + self.config.ttft_ms / 1000)
                return web.json_response(draft.response(done=True))
            return await self._stream_response(request, draft, started)

    async def rerank(self, request: web.Request) -> web.Response:
        """``POST /v1/rerank`` (Jina/Cohere shape): documents by relevance to ``query``, best first."""
        try:
            body = await self._admit(request)
            query = body.get("query")
            if not isinstance(query, str) or not query:
                raise ApiError(400, "'query' must be a non-empty string", param="query")
            docs = [_document_text(d) for d in _non_empty_list(body.get("documents"), "documents")]
            top_n = body.get("top_n")
            if top_n is None:
                top_n = 0
            if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
                raise ApiError(400, "'top_n' must be a non-negative integer", param="top_n")
        except ApiError as err:
            return err.response()
        tokens = sum(count_tokens(query) + count_tokens(d) for d in docs)
        await self._score_delay(tokens)
        scored = sorted(((relevance(query, d, self.config.embedding_dim), i) for i, d in enumerate(docs)),
                        key=lambda pair: (-pair[0], pair[1]))
        results = [{"index": i, "document": {"text": docs[i]}, "relevance_score": score}
                   for score, i in scored[:top_n or len(docs)]]
        return web.json_response({"id": f"rerank-{uuid.uuid4().hex}", "model": self.config.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results})

    async def score(self, request: web.Request) -> web.Response:
        """``POST /v1/score``: one score per (text_1, text_2) pair; a single text_1 is paired with every text_2."""
        try:
            body = await self._admit(request)
            left = _texts(body.get("text_1"), "text_1")
            right = _texts(body.get("text_2"), "text_2")
            if len(left) == 1:
                left = left * len(right)
            if len(left) != len(right):
                raise ApiError(400, f"'text_1' ({len(left)} items) and 'text_2' ({len(right)} items) must be "
                                    "the same length unless text_1 is a single text", param="text_2")
        except ApiError as err:
            return err.response()
        tokens = sum(count_tokens(a) + count_tokens(b) for a, b in zip(left, right, strict=True))
        await self._score_delay(tokens)
        data = [{"index": i, "object": "score", "score": relevance(a, b, self.config.embedding_dim)}
                for i, (a, b) in enumerate(zip(left, right, strict=True))]
        return web.json_response({
            "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": self.config.model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        })

    async def _score_delay(self, prompt_tokens: int) -> None:
        """A pooling request: one forward pass (``ttft_ms``) in a generation slot, counted in the metrics."""
        async with self._slot():
            await asyncio.sleep(self.config.ttft_ms / 1000)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.success("stop")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            text = prompt_text(body.get("prompt", body.get("messages")))
        except ApiError as err:
            return err.response()
        tokens = [seed_for(w) % 32000 for w in text.split()]
        return web.json_response({"count": len(tokens), "max_model_len": self.config.max_model_len, "tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ApiError(400, "'tokens' must be a list of integers", param="tokens")
        except ApiError as err:
            return err.response()
        return web.json_response({"prompt": " ".join(token_stream(sum(tokens), len(tokens))).strip()})

    # -- request parsing -------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _admit(self, request: web.Request) -> dict[str, Any]:
        """Parse the body, check the model, apply injected faults (crash, error, hang)."""
        body = await self._json(request)
        model = body.get("model")
        if model != self.config.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        self.requests_seen += 1
        if self.config.crash_after and self.requests_seen > self.config.crash_after:
            os._exit(CRASH_EXIT_CODE)
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            raise ApiError(500, "simulated engine failure (error_rate)", "InternalServerError")
        if self.config.hang_rate and self.rng.random() < self.config.hang_rate:
            await asyncio.Event().wait()  # until the client goes away and the handler is cancelled
        return body

    def _generation(self, body: dict[str, Any], prompt: str, max_keys: tuple[str, ...]) -> Generation:
        """Parse length, ``n`` and ``stream``; the first of ``max_keys`` present caps the answer."""
        max_key = next((k for k in max_keys if body.get(k) is not None), max_keys[0])
        max_tokens = body.get(max_key)
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ApiError(400, f"'{max_key}' must be a positive integer", param=max_key)
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise ApiError(400, "'n' must be an integer between 1 and 16", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        if body.get("stream_options") is not None and not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        _stream_options(body)
        prompt_tokens = count_tokens(prompt)
        limit = self.config.max_model_len
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_tokens + max_tokens} tokens.", param=max_key)
        seed = seed_for(self.config.seed, prompt, body.get("seed"))
        if max_tokens is not None:
            return Generation(prompt_tokens, max_tokens, "length", n, seed)
        length = 1 + seed % self.config.max_tokens_default
        return Generation(prompt_tokens, length, "stop", n, seed)

    # -- generation ------------------------------------------------------------------------------

    def _slot(self) -> _Slot:
        return _Slot(self)

    async def _generate(self, request: web.Request, body: dict[str, Any], gen: Generation,
                        *, chat: bool) -> web.StreamResponse:
        started = time.monotonic()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        texts = [token_stream(gen.seed + i, gen.completion_tokens) for i in range(gen.n)]
        usage = {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens + gen.completion_tokens * gen.n,
                 "completion_tokens": gen.completion_tokens * gen.n}
        async with self._slot():
            self.metrics.prompt_tokens.inc(gen.prompt_tokens)
            if not body.get("stream"):
                await asyncio.sleep(self._duration(gen.completion_tokens))
                self._finish(gen, started, started + self.config.ttft_ms / 1000)
                return web.json_response(self._full_body(rid, created, chat, texts, gen, usage))
            return await self._stream(request, body, rid, created, chat, texts, gen, usage, started)

    async def _token_steps(self, count: int) -> AsyncIterator[int]:
        """Yield 0..count-1, each when that token is due (the first at once: TTFT is the caller's)."""
        per_token = 1 / self.config.tokens_per_s if self.config.tokens_per_s else 0.0
        for step in range(count):
            if step and per_token:
                await asyncio.sleep(per_token)
            yield step

    async def _stream_response(self, request: web.Request, draft: ResponseDraft,
                               started: float) -> web.StreamResponse:
        """The Responses API's SSE events (``event:`` + ``data:`` pairs), paced like chat tokens."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events = ResponseEvents(draft)
        await resp.write(events.opening())
        await asyncio.sleep(self.config.ttft_ms / 1000)
        first_token_at = time.monotonic()
        async for step in self._token_steps(len(draft.tokens)):
            await resp.write(events.delta(step))
        await resp.write(events.closing())
        await resp.write_eof()
        self._finish(draft.gen, started, first_token_at)
        return resp

    def _duration(self, tokens: int) -> float:
        per_token = 1 / self.config.tokens_per_s if self.config.tokens_per_s else 0.0
        return self.config.ttft_ms / 1000 + max(0, tokens - 1) * per_token

    def _finish(self, gen: Generation, started: float, first_token_at: float) -> None:
        self.metrics.generation_tokens.inc(gen.completion_tokens * gen.n)
        self.metrics.ttft.observe(first_token_at - started)
        self.metrics.e2e.observe(time.monotonic() - started)
        self.metrics.success(gen.finish_reason)

    def _full_body(self, rid: str, created: int, chat: bool, texts: list[list[str]], gen: Generation,
                   usage: dict[str, int]) -> dict[str, Any]:
        if chat:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": "".join(t), "tool_calls": []},
                 "logprobs": None, "finish_reason": gen.finish_reason, "stop_reason": None}
            for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": gen.finish_reason,
                        "stop_reason": None} for i, t in enumerate(texts)]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.config.model, "choices": choices, "usage": usage}

    async def _stream(self, request: web.Request, body: dict[str, Any], rid: str, created: int, chat: bool,
                      texts: list[list[str]], gen: Generation, usage: dict[str, int],
                      started: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.config.model}
        include_usage, continuous = _stream_options(body)
        emitted = [0]

        def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            if continuous and "usage" not in extra:   # vLLM: the running count on every event
                emitted[0] += sum(1 for c in choices if (c.get("delta") or {}).get("content") or c.get("text"))
                extra["usage"] = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": emitted[0],
                                  "total_tokens": gen.prompt_tokens + emitted[0]}
            return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

        await asyncio.sleep(self.config.ttft_ms / 1000)
        first_token_at = time.monotonic()
        if chat:
            await resp.write(b"".join(frame([{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]) for i in range(gen.n)))
        async for step in self._token_steps(gen.completion_tokens):
            last = step == gen.completion_tokens - 1
            finish = gen.finish_reason if last and not chat else None
            chunks = []
            for i, text in enumerate(texts):
                if chat:
                    choice = {"index": i, "delta": {"content": text[step]}, "logprobs": None, "finish_reason": None}
                else:
                    choice = {"index": i, "text": text[step], "logprobs": None, "finish_reason": finish,
                              "stop_reason": None}
                chunks.append(frame([choice]))
            await resp.write(b"".join(chunks))
        if chat:
            await resp.write(b"".join(frame([{"index": i, "delta": {"content": ""}, "logprobs": None,
                                               "finish_reason": gen.finish_reason, "stop_reason": None}])
                                      for i in range(gen.n)))
        if include_usage:
            await resp.write(frame([], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self._finish(gen, started, first_token_at)
        return resp


_LAX_TRUE = ("1", "true", "t", "yes", "y", "on")
_LAX_FALSE = ("0", "false", "f", "no", "n", "off")


def _lax_bool(value: object, param: str) -> bool:
    """A boolean field as pydantic's lax mode (vLLM's request models) reads it; 400 otherwise."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LAX_TRUE + _LAX_FALSE:
        return value.strip().lower() in _LAX_TRUE
    raise ApiError(400, f"'{param}' must be a boolean", param=param)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(include_usage, continuous usage) from ``stream_options``; 400 when it is malformed."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    # vLLM's StreamOptions.include_usage defaults to True: present-but-empty options ask for usage
    # (an explicit null does not)
    include = "include_usage" not in options or _lax_bool(options["include_usage"], "stream_options.include_usage")
    continuous = _lax_bool(options.get("continuous_usage_stats"), "stream_options.continuous_usage_stats")
    return include, include and continuous


def _non_empty_list(value: object, param: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'{param}' must be a non-empty list", param=param)
    return value


def _document_text(doc: object) -> str:
    """A rerank document: a string or ``{"text": ...}`` (Cohere/Jina)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return str(doc["text"])
    raise ApiError(400, "each document must be a string or an object with a 'text' string", param="documents")


def _texts(value: object, param: str) -> list[str]:
    """``text_1``/``text_2`` of a score request: a string or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    items = _non_empty_list(value, param)
    if not all(isinstance(t, str) for t in items):
        raise ApiError(400, f"'{param}' must be a string or a list of strings", param=param)
    return items


class _Slot:
    """One of ``max_concurrency`` generation slots, keeping the running/waiting gauges true."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    async def __aenter__(self) -> None:
        m = self.engine.metrics
        m.waiting.inc()
        try:
            await self.engine.slots.acquire()
        finally:
            m.waiting.dec()
        m.running.inc()
        m.kv_cache_usage.inc(1 / self.engine.config.max_concurrency)

    async def __aexit__(self, *exc: object) -> None:
        m = self.engine.metrics
        m.running.dec()
        m.kv_cache_usage.dec(1 / self.engine.config.max_concurrency)
        self.engine.slots.release()


def build_app(config: SimConfig) -> web.Application:
    """The aiohttp application for ``config`` (tests may run it in-process)."""
    config.validate()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(SimEngine(config).routes())
    return app


def parse_args(argv: list[str] | None = None) -> SimConfig:
    """Command-line flags → SimConfig (one flag per field, dashes for underscores)."""
    parser = argparse.ArgumentParser(prog="python -m agent.sim", description=__doc__.split("\n")[0])
    defaults = SimConfig()
    for f in fields(SimConfig):
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    config = SimConfig(**vars(args))
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m agent.sim``."""
    config = parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # optional speed-up
        pass
    if config.startup_delay_s:
        time.sleep(config.startup_delay_s)  # like an engine loading weights: the port is closed meanwhile
    web.run_app(build_app(config), host=config.host, port=config.port, print=None, access_log=None,
                handler_cancellation=True, shutdown_timeout=5)
