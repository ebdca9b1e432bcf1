"""The SSE tap: usage found in the last usage event, content events counted, usage event stripped
exactly, whatever the chunk boundaries; and the request rewrite that asks engines for usage."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import (
    StreamTap,
    TokenUsage,
    parse_event,
    usage_from_body,
    usage_from_tail,
    with_usage_requested,
)


def chat_stream(words: list[str], usage: dict[str, int] | None, *, compact: bool = False,
                null_usage: bool = False) -> tuple[bytes, bytes]:
    """(stream with the usage event, the same stream without it) as an engine would write them."""
    sep = (",", ":") if compact else (", ", ": ")
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def frame(choices: list[object], **extra: object) -> bytes:
        body = {**head, "choices": choices, **extra}
        if null_usage and "usage" not in extra:
            body["usage"] = None          # SGLang writes "usage": null in every chunk
        return b"data: " + json.dumps(body, separators=sep).encode() + b"\n\n"

    frames = [frame([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    frames += [frame([{"index": 0, "delta": {"content": w}}]) for w in words]
    frames.append(frame([{"index": 0, "delta": {"content": ""}, "finish_reason": "length"}]))
    without = b"".join(frames) + b"data: [DONE]\n\n"
    if usage is None:
        return without, without
    with_usage = b"".join(frames) + frame([], usage=usage) + b"data: [DONE]\n\n"
    return with_usage, without


def feed_all(tap: StreamTap, data: bytes, cuts: list[int]) -> bytes:
    out, prev, t = [], 0, 0.0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut <= prev:
            continue
        t += 0.01
        out.append(tap.feed(data[prev:cut], t))
        prev = cut
    out.append(tap.finish())
    return b"".join(out)


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
WORDS = ["a", "b", "c", "d", "e"]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), compact=st.booleans(), null_usage=st.booleans())
def test_strip_mode_yields_exactly_the_stream_without_usage(data: st.DataObject, compact: bool,
                                                            null_usage: bool) -> None:
    with_usage, without = chat_stream(WORDS, USAGE, compact=compact, null_usage=null_usage)
    cuts = data.draw(st.lists(st.integers(1, len(with_usage) - 1), max_size=12))
    tap = StreamTap(0.0, strip_usage=True)
    assert feed_all(tap, with_usage, cuts) == without
    assert tap.usage() == TokenUsage(7, 5) and tap.stripped
    assert tap.token_events == len(WORDS)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), compact=st.booleans())
def test_pass_mode_never_changes_bytes_and_finds_usage(data: st.DataObject, compact: bool) -> None:
    with_usage, _ = chat_stream(WORDS, USAGE, compact=compact)
    cuts = data.draw(st.lists(st.integers(1, len(with_usage) - 1), max_size=12))
    tap = StreamTap(0.0)
    assert feed_all(tap, with_usage, cuts) == with_usage
    assert tap.usage() == TokenUsage(7, 5) and not tap.stripped


def test_no_usage_event_means_no_usage_and_nothing_stripped() -> None:
    stream, _ = chat_stream(WORDS, None, null_usage=True)
    tap = StreamTap(0.0, strip_usage=True)
    assert feed_all(tap, stream, [10, 200]) == stream
    assert tap.usage() is None and not tap.stripped


def test_last_usage_event_wins_with_continuous_usage() -> None:
    events = b"".join(b"data: " + orjson.dumps({"choices": [{"delta": {"content": "x"}}],
                                                "usage": {"prompt_tokens": 3, "completion_tokens": i}}) + b"\n\n"
                      for i in range(1, 5))
    tap = StreamTap(0.0)
    feed_all(tap, events + b"data: [DONE]\n\n", [])
    assert tap.usage() == TokenUsage(3, 4)


def test_ttft_and_one_gap_per_content_event() -> None:
    stream, _ = chat_stream(["a", "b", "c"], None)
    frames = [f + b"\n\n" for f in stream.split(b"\n\n") if f]
    tap = StreamTap(started=1.0)
    tap.feed(frames[0], 1.5)                  # role event, empty content: not a token
    assert tap.ttft is None
    tap.feed(frames[1], 2.0)
    tap.feed(frames[2] + frames[3], 2.4)      # two tokens in one chunk: two gaps of 0.2
    tap.feed(frames[4] + frames[5], 3.0)      # finish (empty content) and [DONE]
    assert tap.ttft == pytest.approx(1.0)
    assert tap.token_events == 3
    assert [(round(g, 6), n) for g, n in tap.gaps] == [(0.2, 2)]


def test_completions_text_events_count_as_tokens() -> None:
    frames = b"".join(b"data: " + orjson.dumps({"choices": [{"text": t}]}) + b"\n\n" for t in ["x", "y", ""])
    tap = StreamTap(0.0, field="text")
    tap.feed(frames, 0.1)
    assert tap.token_events == 2


def test_responses_api_usage_is_mapped() -> None:
    event = (b"event: response.completed\ndata: " +
             orjson.dumps({"type": "response.completed",
                           "response": {"usage": {"input_tokens": 9, "output_tokens": 4}}}) + b"\n\n")
    tap = StreamTap(0.0)
    tap.feed(event, 0.0)
    assert tap.usage() == TokenUsage(9, 4)
    assert parse_event(b"event: x\ndata: {\"a\": 1}") == {"a": 1}


def test_usage_from_body_and_tail() -> None:
    body = orjson.dumps({"data": [{"embedding": [0.1] * 10}], "usage": {"prompt_tokens": 4, "total_tokens": 4}})
    assert usage_from_body(body) == TokenUsage(4, 0)
    assert usage_from_body(b"not json") is None
    assert usage_from_body(b'{"usage": null}') is None
    assert usage_from_tail(body[-60:]) == TokenUsage(4, 0)
    assert usage_from_tail(b'..."usage": null}') is None


def test_huge_unframed_body_is_passed_through_without_buffering_forever() -> None:
    tap = StreamTap(0.0, strip_usage=True)
    blob = b"x" * (2 << 20)
    assert tap.feed(blob, 0.0) == blob
    assert tap.finish() == b""


# -- asking the engine for usage ---------------------------------------------------------------


def _rewrite(body: dict[str, object], route: str = "/v1/chat/completions") -> dict[str, object] | None:
    raw = orjson.dumps(body)
    out = with_usage_requested(route, body, raw)
    return None if out is None else orjson.loads(out)


def test_stream_without_usage_option_gets_include_usage() -> None:
    body = {"model": "m", "messages": [], "stream": True}
    assert _rewrite(body) == {**body, "stream_options": {"include_usage": True}}
    assert _rewrite({**body, "stream_options": None}) == {**body, "stream_options": {"include_usage": True}}
    assert _rewrite({**body, "stream_options": {"include_usage": False}}) == {
        **body, "stream_options": {"include_usage": True}}
    assert _rewrite({"model": "m", "prompt": "x", "stream": True}, "/v1/completions") is not None


def test_spliced_body_keeps_the_original_bytes() -> None:
    raw = b'{"model": "m",  "stream": true, "messages": [{"role": "user", "content": "}"}]}\n'
    payload = orjson.loads(raw)
    out = with_usage_requested("/v1/chat/completions", payload, raw)
    assert out is not None and out.startswith(raw.rstrip()[:-1])
    assert orjson.loads(out) == {**payload, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("body,route", [
    ({"model": "m", "stream": False}, "/v1/chat/completions"),
    ({"model": "m"}, "/v1/chat/completions"),
    ({"model": "m", "stream": True, "stream_options": {"include_usage": True}}, "/v1/chat/completions"),
    ({"model": "m", "stream": True, "stream_options": "bad"}, "/v1/chat/completions"),
    ({"model": "m", "stream": True}, "/v1/embeddings"),
    ({"model": "m", "stream": True}, "/v1/responses"),
])
def test_requests_left_alone(body: dict[str, object], route: str) -> None:
    assert _rewrite(body, route) is None


def test_weighted_itl_histogram_equals_one_observation_per_event() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import ITL_BUCKETS, WeightedHistogram

    mine, ref = CollectorRegistry(), CollectorRegistry()
    weighted = WeightedHistogram("itl_seconds", "gaps", ITL_BUCKETS, mine)
    plain = Histogram("itl_seconds", "gaps", ["model"], buckets=ITL_BUCKETS, registry=ref)
    for gap, k in [(0.02, 3), (0.001, 1), (0.3, 2), (7.0, 1), (0.0, 4)]:
        weighted.observe("m", gap, k)
        for _ in range(k):
            plain.labels("m").observe(gap)

    def samples(reg: CollectorRegistry) -> list[bytes]:
        return [line for line in generate_latest(reg).splitlines() if b"_created" not in line]

    assert samples(mine) == samples(ref)


def test_lock_free_series_expose_like_prometheus_client() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from gateway.metrics import LATENCY_BUCKETS, LabelledCounter, WeightedHistogram

    mine, ref = CollectorRegistry(), CollectorRegistry()
    hist = WeightedHistogram("dur_seconds", "d", LATENCY_BUCKETS, mine, ["model", "route"])
    count = LabelledCounter("reqs", "r", ["model", "status"], mine)
    plain_hist = Histogram("dur_seconds", "d", ["model", "route"], buckets=LATENCY_BUCKETS, registry=ref)
    plain_count = Counter("reqs", "r", ["model", "status"], registry=ref)
    for model, route, seconds, status in [("a", "/x", 0.003, "200"), ("a", "/x", 2.0, "200"), ("b", "/y", 0.1, "429"),
                                          ("a", "/y", 400.0, "200")]:
        hist.observe((model, route), seconds)
        plain_hist.labels(model, route).observe(seconds)
        count.inc((model, status))
        plain_count.labels(model, status).inc()

    def samples(reg: CollectorRegistry) -> list[bytes]:
        return sorted(line for line in generate_latest(reg).splitlines() if b"_created" not in line)

    assert samples(mine) == samples(ref)


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_a_body_read_at_once_gives_usage_and_first_token_but_no_gaps(strip: bool, compact: bool) -> None:
    with_usage, without = chat_stream(WORDS, USAGE, compact=compact)
    tap = StreamTap(1.0, strip_usage=strip)
    assert tap.feed_all(with_usage, 1.5) == (without if strip else with_usage)
    assert tap.usage() == TokenUsage(7, 5)
    assert tap.ttft == pytest.approx(0.5)
    assert tap.gaps == [] and tap.token_events == 0
    empty = StreamTap(1.0)
    empty.feed_all(chat_stream([], None, compact=compact)[0], 2.0)
    assert empty.ttft is None  # only the role and the final event: no token arrived


def test_responses_stream_counts_output_text_deltas_and_finds_nested_usage() -> None:
    def event(kind: str, **data: object) -> bytes:
        payload = json.dumps({"type": kind, **data}, separators=(",", ":")).encode()
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    final = {"id": "resp_1", "object": "response", "status": "completed",
             "usage": {"input_tokens": 4, "output_tokens": 3, "total_tokens": 7}}
    events = [event("response.created", response={**final, "status": "in_progress", "usage": None})]
    events += [event("response.output_text.delta", item_id="msg_1", delta=w) for w in ("a", " b", " c")]
    events += [event("response.output_text.done", item_id="msg_1", text="a b c"),
               event("response.completed", response=final)]
    tap = StreamTap(0.0, field="delta")
    for i, e in enumerate(events):
        assert tap.feed(e, 0.1 * i) == e
    assert tap.token_events == 3 and tap.ttft == pytest.approx(0.1)
    assert tap.usage() == TokenUsage(4, 3)
