"""Pure cores of the hardened edge: the deadline clock, limits, usage requests, fault attribution."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edge import EdgeLimits, Phase, derive_max_connections, overdue, shed_victims, valid_request_id
from gateway.ejection import Attribution, Ejections
from gateway.sse import fallback_usage, lax_bool, with_usage_requested

# -- deadlines and shedding ------------------------------------------------------------------------

TIMEOUTS = {Phase.HEAD: 10.0, Phase.IDLE: 75.0, Phase.BODY: 60.0, Phase.LINGER: 5.0, Phase.BLOCKED: 60.0}


def test_overdue_is_exactly_the_phase_deadline() -> None:
    assert not overdue(Phase.HEAD, 100.0, 109.9, TIMEOUTS)
    assert overdue(Phase.HEAD, 100.0, 110.0, TIMEOUTS)
    assert not overdue(Phase.IDLE, 100.0, 170.0, TIMEOUTS) and overdue(Phase.IDLE, 100.0, 175.0, TIMEOUTS)
    assert not overdue(Phase.NONE, 0.0, 1e9, TIMEOUTS)     # a request being answered has no reading deadline


def test_shedding_takes_lingering_then_heads_then_idle_oldest_first() -> None:
    entries = [("idle-old", Phase.IDLE, 1.0), ("head-new", Phase.HEAD, 9.0), ("busy", Phase.NONE, 0.0),
               ("head-old", Phase.HEAD, 2.0), ("body", Phase.BODY, 0.5), ("linger", Phase.LINGER, 8.0)]
    assert shed_victims(entries, 10) == ["linger", "head-old", "head-new", "idle-old"]
    assert shed_victims(entries, 2) == ["linger", "head-old"]
    assert shed_victims([("busy", Phase.NONE, 0.0), ("body", Phase.BODY, 0.0)], 5) == []


@given(st.lists(st.tuples(st.sampled_from(list(Phase)), st.floats(0, 100)), max_size=50), st.integers(1, 60))
def test_shed_victims_are_the_cheapest_oldest(entries: list[tuple[Phase, float]], count: int) -> None:
    named = [(i, phase, since) for i, (phase, since) in enumerate(entries)]
    got = shed_victims(named, count)
    rank = {Phase.LINGER: 0, Phase.HEAD: 1, Phase.IDLE: 2}
    eligible = sorted((rank[p], t, i) for i, p, t in named if p in rank)
    assert got == [i for _, _, i in eligible[:count]]


# -- limits ----------------------------------------------------------------------------------------


def test_connection_cap_leaves_room_for_an_upstream_per_client() -> None:
    assert derive_max_connections(20_000, 256) == 9872
    assert derive_max_connections(1024, 256) == 384
    assert derive_max_connections(100, 256) == 16      # never below a usable floor


def test_limits_validate() -> None:
    EdgeLimits().validate()
    with pytest.raises(ValueError, match="head_timeout_s"):
        EdgeLimits(head_timeout_s=0).validate()
    with pytest.raises(ValueError, match="max_connections"):
        EdgeLimits(max_connections=-1).validate()


@pytest.mark.parametrize("rid,ok", [(b"abc-123", True), (b"x" * 128, True), (b"x" * 129, False), (b"", False),
                                    (b"with space", False), (b"tab\there", False), ("é".encode(), False),
                                    (b"\x7f", False), (b"~!@#$%^&*()_+{}|:<>?", True)])
def test_request_ids_are_bounded_visible_ascii(rid: bytes, ok: bool) -> None:
    assert valid_request_id(rid) is ok


# -- asking the engine for usage -------------------------------------------------------------------


@pytest.mark.parametrize("value,expect", [(True, True), (False, False), (1, True), (0, False), ("true", True),
                                          ("Yes", True), ("off", False), (" n ", False), (None, None), (2, None),
                                          ("maybe", None), ([], None), ({}, None), (1.0, None)])
def test_lax_bool_reads_as_pydantic_lax_mode(value: object, expect: bool | None) -> None:
    assert lax_bool(value) is expect


def _rewrite(payload: dict[str, object]) -> dict[str, object] | None:
    out = with_usage_requested("/v1/chat/completions", payload, orjson.dumps(payload))
    return None if out is None else orjson.loads(out)


def test_every_stream_asks_for_usage_whatever_its_options() -> None:
    base = {"model": "m", "stream": True}
    cases = [
        ({"include_usage": False, "continuous_usage_stats": False}, {"include_usage": True,
                                                                     "continuous_usage_stats": False}),
        ({"include_usage": False, "continuous_usage_stats": True}, {"include_usage": True,
                                                                    "continuous_usage_stats": False}),
        ({"include_usage": "no", "x_vendor": 1}, {"include_usage": True, "x_vendor": 1}),
        ({"include_usage": None}, {"include_usage": True}),
    ]
    for options, sent in cases:
        assert _rewrite({**base, "stream_options": options}) == {**base, "stream_options": sent}, options
    assert _rewrite({"model": "m", "stream": 1}) == {"model": "m", "stream": 1,
                                                     "stream_options": {"include_usage": True}}


# {} and options without include_usage ask for usage: vLLM's StreamOptions.include_usage defaults to true
@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": "yes"}, {},
                                     {"continuous_usage_stats": True}, {"include_usage": "maybe"},
                                     {"continuous_usage_stats": "x"}, "on", []])
def test_streams_that_asked_or_that_the_engine_refuses_are_sent_unchanged(options: object) -> None:
    assert _rewrite({"model": "m", "stream": True, "stream_options": options}) is None


def test_fallback_usage_counts_events_and_estimates_the_prompt() -> None:
    assert fallback_usage(400, 7).completion_tokens == 7
    assert fallback_usage(400, 7).prompt_tokens == 100


# -- fault attribution and ejection ----------------------------------------------------------------


def test_a_failure_reproduced_on_a_second_instance_blames_nobody() -> None:
    fault = Attribution()
    first = fault.answer_failed("a")
    assert first.retry and first.blame == ()
    second = fault.answer_failed("b")
    assert not second.retry and second.blame == ()
    assert fault.answered() == ()


def test_a_failure_another_instance_does_not_reproduce_blames_the_first() -> None:
    fault = Attribution()
    assert fault.answer_failed("a").retry
    assert fault.answered() == ("a",)


def test_connect_failures_blame_at_once_and_a_lone_answer_failure_counts() -> None:
    fault = Attribution()
    assert fault.connect_failed("a").blame == ("a",)
    assert fault.answer_failed("b").retry
    assert fault.gave_up() == ("b",)


def test_ejection_needs_failures_of_different_requests() -> None:
    ej = Ejections(threshold=2)
    assert [ej.failed("a", request=7) for _ in range(5)] == [False] * 5   # one request, however often
    assert ej.failed("a", request=8) is True
    assert ej.ejected("a")
    ej.succeeded("a")
    assert ej.failed("a", request=9) is False
