"""Pure cores of the hardened edge: the deadline clock, limits, usage requests, fault attribution."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edge import EdgeLimits, Phase, PhaseClock, derive_max_connections, valid_request_id
from gateway.ejection import Attribution, Ejections
from gateway.sse import fallback_usage, lax_bool, with_usage_requested

# -- PhaseClock -------------------------------------------------------------------------------------


def test_phase_clock_expires_in_deadline_order_and_moves_connections() -> None:
    clock: PhaseClock[str] = PhaseClock({Phase.HEAD: 10.0, Phase.IDLE: 75.0, Phase.BODY: 60.0})
    clock.set("a", Phase.HEAD, 0.0)
    clock.set("b", Phase.HEAD, 1.0)
    clock.set("c", Phase.IDLE, 0.0)
    clock.set("a", Phase.BODY, 5.0)            # a's head completed: its head deadline no longer applies
    assert clock.phase("a") is Phase.BODY and clock.count(Phase.HEAD) == 1
    assert clock.expired(10.5) == []
    assert clock.expired(11.0) == [("b", Phase.HEAD)]
    assert clock.phase("b") is Phase.NONE
    assert clock.expired(65.0) == [("a", Phase.BODY)]
    clock.forget("c")
    assert clock.expired(1000.0) == [] and len(clock) == 0


def test_phase_clock_oldest_prefers_the_first_phase_and_skips_ineligible() -> None:
    clock: PhaseClock[str] = PhaseClock({Phase.LINGER: 5.0, Phase.HEAD: 10.0, Phase.IDLE: 75.0})
    for i, (name, phase) in enumerate([("idle1", Phase.IDLE), ("head1", Phase.HEAD), ("head2", Phase.HEAD)]):
        clock.set(name, phase, float(i))
    assert clock.oldest((Phase.LINGER, Phase.HEAD, Phase.IDLE)) == "head1"
    assert clock.oldest((Phase.LINGER, Phase.HEAD, Phase.IDLE), lambda c: c != "head1") == "head2"
    assert clock.oldest((Phase.LINGER, Phase.HEAD, Phase.IDLE), lambda c: c.startswith("idle")) == "idle1"
    clock.set("lingering", Phase.LINGER, 9.0)
    assert clock.oldest((Phase.LINGER, Phase.HEAD, Phase.IDLE)) == "lingering"
    assert clock.oldest((Phase.LINGER,), lambda c: False) is None


@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from([Phase.NONE, Phase.HEAD, Phase.IDLE]),
                          st.floats(0, 100)), max_size=60), st.floats(0, 200))
def test_phase_clock_expiry_is_exactly_the_overdue(moves: list[tuple[int, Phase, float]], now: float) -> None:
    timeouts = {Phase.HEAD: 10.0, Phase.IDLE: 30.0}
    clock: PhaseClock[int] = PhaseClock(timeouts)
    where: dict[int, tuple[Phase, float]] = {}
    t = 0.0
    for conn, phase, dt in moves:
        t += dt / 10
        clock.set(conn, phase, t)
        if phase is Phase.NONE:
            where.pop(conn, None)
        else:
            where[conn] = (phase, t)
    expect = {c for c, (p, since) in where.items() if since + timeouts[p] <= t + now}
    assert {c for c, _ in clock.expired(t + now)} == expect
    assert len(clock) == len(where) - len(expect)


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
        ({"continuous_usage_stats": True}, {"include_usage": True, "continuous_usage_stats": False}),
        ({"include_usage": "no", "x_vendor": 1}, {"include_usage": True, "x_vendor": 1}),
        ({"include_usage": None}, {"include_usage": True}),
        ({}, {"include_usage": True}),
    ]
    for options, sent in cases:
        assert _rewrite({**base, "stream_options": options}) == {**base, "stream_options": sent}, options
    assert _rewrite({"model": "m", "stream": 1}) == {"model": "m", "stream": 1,
                                                     "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": "yes"},
                                     {"include_usage": "maybe"}, {"continuous_usage_stats": "x"}, "on", []])
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
