"""Taps on upstream response bytes: token usage, time to first token, inter-token gaps.

The relay loop hands every chunk to ``StreamTap.feed`` before writing it to the client; the tap
does only byte scans (``rfind``/``count`` in C) and keeps no copy of the stream, except the
unfinished tail of an event cut by a chunk boundary. Only the last complete event whose
``"usage"`` is an object is kept, and it is parsed once, when the stream ends.

    chunk ─▶ carry+chunk ─▶ complete events [0, end) ──▶ count content events (TTFT, gaps)
                              │                      └─▶ rfind '"usage"' + '{' → keep that event
                              └─ tail after the last blank line ─▶ carry (next chunk)

Strip mode (``strip_usage=True``): the gateway asked the engine for usage the client did not
ask for (``stream_options.include_usage``); the tap then removes that usage event and passes
every other byte through unchanged, holding back only an unfinished event until it completes.
Events are separated by a blank line (``\\n\\n``), as vLLM and SGLang write them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import orjson

_USAGE = b'"usage"'
_SEP = b"\n\n"
# Token events carry a non-empty string in the route's field: chat deltas ("content",
# "reasoning_content"), completions ("text"), responses ("delta" of output_text.delta events).
# Per field and JSON style (compact as vLLM/SGLang write it, or spaced as Python's json.dumps,
# decided once per stream): (a string value, an empty string value); 2 scans a chunk.
_PATTERNS = {
    ("content", False): (b'content":"', b'content":""'),
    ("content", True): (b'content": "', b'content": ""'),
    ("text", False): (b'"text":"', b'"text":""'),
    ("text", True): (b'"text": "', b'"text": ""'),
    ("delta", False): (b'"delta":"', b'"delta":""'),
    ("delta", True): (b'"delta": "', b'"delta": ""'),
}
#: The JSON field that carries generated text in a route's stream events (default "content").
TOKEN_FIELDS = {"/v1/completions": "text", "/v1/responses": "delta"}
MAX_CARRY = 1 << 20   # an "event" longer than this without a blank line is not SSE: stop scanning it


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens a response reports (OpenAI names; /v1/responses' input/output are mapped)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


NO_USAGE = TokenUsage()


def usage_from(obj: object) -> TokenUsage | None:
    """The ``usage`` of a parsed response body or event (also nested under ``response``)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        inner = obj.get("response")
        usage = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return TokenUsage(_int(prompt), _int(completion))


def usage_from_body(body: bytes) -> TokenUsage | None:
    """Usage of a complete JSON response body (parsed once); None when absent or not JSON."""
    try:
        return usage_from(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def usage_from_tail(tail: bytes) -> TokenUsage | None:
    """Usage from the end of a large JSON body: the last ``"usage": {...}`` object in ``tail``."""
    at = tail.rfind(_USAGE)
    while at >= 0 and not usage_is_object(tail, at, len(tail)):
        at = tail.rfind(_USAGE, 0, at)
    if at < 0:
        return None
    brace = tail.find(b"{", at)
    try:
        obj, _ = json.JSONDecoder().raw_decode(tail[brace:].decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return usage_from({"usage": obj})


#: Routes whose streams carry usage only when the request asks for it (stream_options).
USAGE_OPT_IN_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions"))

# JSON values an engine's request model (pydantic in lax mode, as vLLM and SGLang parse) reads as
# true / false; anything else in a boolean field is a 400 from the engine.
_LAX_TRUE = frozenset(("1", "true", "t", "yes", "y", "on"))
_LAX_FALSE = frozenset(("0", "false", "f", "no", "n", "off"))


def lax_bool(value: object) -> bool | None:
    """What a lax boolean field makes of ``value``: True, False, or None (not a boolean at all)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _LAX_TRUE:
            return True
        if low in _LAX_FALSE:
            return False
    return None


def with_usage_requested(route: str, payload: dict[str, object], body: bytes) -> bytes | None:
    """The body to send upstream so that a stream reports its usage, or None to send ``body`` as is.

    Every streaming chat/completions request gets ``stream_options.include_usage: true`` unless
    the client asked for usage itself (``include_usage`` true, or ``stream_options`` without
    ``include_usage``: vLLM's ``StreamOptions.include_usage`` defaults to true). With
    ``include_usage`` off an engine ignores ``continuous_usage_stats`` (vLLM, SGLang), so a
    client's ``continuous_usage_stats: true`` is sent as false: the engine's stream is then
    exactly the one the client's own body would get, plus one final usage event, which
    ``StreamTap(strip_usage=True)`` removes. Other keys of ``stream_options`` are kept. Values an
    engine would reject (a non-boolean ``include_usage``, ``stream_options`` that is not an
    object) are left alone: the engine answers the client's own body, and such a stream is
    counted from its events (``fallback_usage``).
    """
    stream = payload.get("stream")
    if route not in USAGE_OPT_IN_ROUTES or (stream is not True and (stream is None or stream is False
                                                                     or lax_bool(stream) is not True)):
        return None
    if "stream_options" not in payload:
        end = body.rstrip().rfind(b"}")
        if end <= 0:
            return None
        # splice instead of re-serialising: the rest of the body stays byte for byte
        return body[:end] + b',"stream_options":{"include_usage":true}' + body[end:]
    options = payload["stream_options"]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return None
    if "include_usage" not in options and payload["stream_options"] is not None:
        return None          # vLLM's default: stream_options without include_usage asks for usage
    asked = options.get("include_usage")
    if asked is True or (asked is not None and lax_bool(asked) is not False):
        return None          # the client asked for usage (or sent a value the engine refuses)
    continuous = options.get("continuous_usage_stats")
    if continuous is not None and lax_bool(continuous) is None:
        return None          # the engine refuses this body; it must see it as the client sent it
    wanted = {**options, "include_usage": True}
    if continuous is not None:
        wanted["continuous_usage_stats"] = False
    return orjson.dumps({**payload, "stream_options": wanted})


def fallback_usage(body_bytes: int, completion_events: int) -> TokenUsage:
    """Usage of a stream whose engine reported none (it ignores ``include_usage``, or the stream
    was cut before its usage event): completion tokens counted from the stream's token events, the
    prompt estimated at 4 bytes of request body per token."""
    return TokenUsage(body_bytes // 4, completion_events)


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def usage_is_object(data: bytes, at: int, end: int) -> bool:
    """True when the ``"usage"`` at ``at`` is followed by ``:`` and an object (not null)."""
    i = at + len(_USAGE)
    while i < end and data[i] in b" \t\r\n":
        i += 1
    if i >= end or data[i] != 0x3A:  # ':'
        return False
    i += 1
    while i < end and data[i] in b" \t\r\n":
        i += 1
    return i < end and data[i] == 0x7B  # '{'


def parse_event(event: bytes) -> object:
    """The JSON payload of one SSE event (its ``data:`` lines joined); None when not JSON."""
    payload = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _has_token(data: bytes, string_value: bytes) -> bool:
    """Whether some ``string_value`` (e.g. ``content":"``) opens a non-empty string."""
    at = data.find(string_value)
    while at >= 0:
        if data[at + len(string_value):at + len(string_value) + 1] != b'"':
            return True
        at = data.find(string_value, at + len(string_value))
    return False


class StreamTap:
    """Incremental scanner of an SSE response; see the module docstring."""

    __slots__ = ("_carry", "_patterns", "_usage_event", "field", "first_token_at", "gaps", "last_token_at",
                 "started", "strip_usage", "stripped", "token_events")

    def __init__(self, started: float, *, strip_usage: bool = False, field: str = "content") -> None:
        self.started = started
        self.strip_usage = strip_usage
        if (field, False) not in _PATTERNS:
            raise ValueError(f"unknown token field {field!r}")
        self.field = field  # chat: "content" (and reasoning_content), completions: "text", responses: "delta"
        self._patterns: tuple[bytes, bytes] | None = None
        self.stripped = False
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.token_events = 0
        self.gaps: list[tuple[float, int]] = []   # (gap per event, events) per chunk after the first
        self._carry = b""
        self._usage_event = b""

    def feed_all(self, body: bytes, now: float) -> bytes:
        """A whole response read at once: usage (and stripping) only, the first token at ``now``.

        A body that arrived in one piece holds no per-token timing, so it is not counted: its
        gaps would all be zero and skew the inter-token histogram.
        """
        out = self.feed(body, now, count=False) + self.finish()
        if self.first_token_at is None and _has_token(body, self._patterns_for(body, len(body))[0]):
            self.first_token_at = self.last_token_at = now
        return out

    def feed(self, chunk: bytes, now: float, *, count: bool = True) -> bytes:
        """Scan ``chunk``; returns the bytes to send to the client (``chunk`` unless stripping)."""
        data = self._carry + chunk if self._carry else chunk
        end = data.rfind(_SEP)
        if end < 0:
            if len(data) > MAX_CARRY:  # not SSE framing: pass through, stop buffering
                self._carry = b""
                return data if self.strip_usage else chunk
            self._carry = data
            return b"" if self.strip_usage else chunk
        tail = end + 2
        self._carry = data[tail:] if tail < len(data) else b""
        events = self._count_content(data, end) if count else 0
        if events:
            self._tokens(events, now)
        at = data.rfind(_USAGE, 0, end)
        while at >= 0 and not usage_is_object(data, at, end):
            at = data.rfind(_USAGE, 0, at)
        if at < 0:
            if self.strip_usage:
                return data[:tail]
            return chunk
        start = data.rfind(_SEP, 0, at)
        start = 0 if start < 0 else start + 2
        stop = data.find(_SEP, at)
        self._usage_event = data[start:stop]
        if not self.strip_usage:
            return chunk
        self.stripped = True
        return data[:start] + data[stop + 2:tail]

    def finish(self) -> bytes:
        """Bytes still held back at the end of the stream (strip mode only)."""
        rest, self._carry = self._carry, b""
        return rest if self.strip_usage else b""

    def count_token_events(self, data: bytes) -> int:
        """Token events in a whole response (``feed_all`` does not count them: only needed when the
        engine reported no usage)."""
        end = data.rfind(_SEP)
        return self._count_content(data, end) if end > 0 else 0

    def usage(self) -> TokenUsage | None:
        """Usage from the last usage event seen, parsed now; None when there was none."""
        if not self._usage_event:
            return None
        return usage_from(parse_event(self._usage_event))

    @property
    def ttft(self) -> float | None:
        """Seconds from the request to the first content event; None when there was none."""
        return None if self.first_token_at is None else self.first_token_at - self.started

    def _patterns_for(self, data: bytes, end: int) -> tuple[bytes, bytes]:
        patterns = self._patterns
        if patterns is None:
            # One serializer writes the whole stream: its first key tells compact from spaced. (A
            # search for '": ' over a compact body would scan all of it, at every '"'.)
            key_end = data.find(b'":', 0, end)
            spaced = key_end >= 0 and data[key_end + 2:key_end + 3] == b" "
            patterns = self._patterns = _PATTERNS[(self.field, spaced)]
        return patterns

    def _count_content(self, data: bytes, end: int) -> int:
        string, empty = self._patterns or self._patterns_for(data, end)
        n = data.count(string, 0, end)
        return n - data.count(empty, 0, end) if n else 0  # the role and final events carry ""

    def _tokens(self, events: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
            if events > 1:
                self.gaps.append((0.0, events - 1))
        else:
            self.gaps.append(((now - self.last_token_at) / events, events))
        self.last_token_at = now
        self.token_events += events
