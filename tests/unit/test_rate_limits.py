"""Rate limits (pure, clock injected), usage book, demand meter, private-model access, 429 envelope."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.keys import Keys
from controlplane.pb import ApiKey, ModelAccess, ModelSpec, Usage
from controlplane.store import Change, Changes, KeyValue, Resync
from controlplane.store.cache import proto_decoder, to_event
from gateway.auth import ANONYMOUS, ModelAccessTable, Principal, check_model_access
from gateway.errors import Forbidden, ModelNotFound, RateLimited, error_body
from gateway.limits import REQUESTS, TOKENS, RateLimiter, TokenBucket, format_duration, share
from gateway.sse import TokenUsage
from gateway.usage import DemandMeter, UsageBook

SPECS = proto_decoder(ModelSpec)  # what the gateway's cache decodes with


def key(rpm: int = 0, tpm: int = 0, kid: str = "k1") -> ApiKey:
    return ApiKey(key_id=kid, owner="ann", requests_per_minute=rpm, tokens_per_minute=tpm)


# -- token bucket ------------------------------------------------------------------------------


def test_bucket_refills_smoothly_and_caps_at_capacity() -> None:
    b = TokenBucket.full(10, 1.0, now=0.0)
    assert all(b.take(1, 0.0) for _ in range(10))
    assert not b.take(1, 0.0)
    assert b.seconds_until(1, 0.0) == pytest.approx(1.0)
    assert b.take(1, 1.0) and not b.take(1, 1.0)
    b.refill(1000.0)
    assert b.level == 10


def test_bucket_charge_goes_negative_and_recovers_at_rate() -> None:
    b = TokenBucket.full(100, 10.0, now=0.0)
    b.charge(250, 0.0)
    assert b.level == -150
    assert b.seconds_until(0, 0.0) == pytest.approx(15.0)
    b.refill(15.0)
    assert b.level == pytest.approx(0.0)


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 10_000), n=st.integers(1, 16),
       steps=st.lists(st.floats(0, 5, allow_nan=False), max_size=60))
def test_bucket_never_grants_more_than_burst_plus_refill(limit: int, n: int, steps: list[float]) -> None:
    capacity, rate = share(limit, n)
    b = TokenBucket.full(capacity, rate, 0.0)
    now, granted = 0.0, 0
    for dt in steps:
        now += dt
        while b.take(1, now):
            granted += 1
    assert granted <= capacity + rate * now + 1e-6


# -- limiter -----------------------------------------------------------------------------------


def test_unlimited_key_is_always_allowed_without_headers() -> None:
    lim = RateLimiter()
    v = lim.admit(key(), 0.0)
    assert v.allowed and not v.headers


def test_rpm_allows_the_burst_then_429_with_retry_after() -> None:
    lim = RateLimiter()
    k = key(rpm=6)
    verdicts = [lim.admit(k, 0.0) for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 6 + [False]
    denied = verdicts[-1]
    assert denied.kind == REQUESTS
    assert denied.retry_after_s == 10           # 6/min refills one every 10 s
    assert denied.headers["x-ratelimit-limit-requests"] == "6"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    assert verdicts[0].headers["x-ratelimit-remaining-requests"] == "5"
    assert lim.admit(k, 9.0).allowed is False
    assert lim.admit(k, 10.0).allowed is True


def test_fleet_share_halves_the_local_burst_and_rate() -> None:
    lim = RateLimiter(fleet_size=2)
    k = key(rpm=10)
    allowed = sum(lim.admit(k, 0.0).allowed for _ in range(10))
    assert allowed == 5
    v = lim.admit(k, 0.0)
    assert v.retry_after_s == 12                # 5/min per gateway: one every 12 s
    # the gateway reports a fleet-wide estimate of what is left, never more than the limit
    lim2 = RateLimiter(fleet_size=2)
    assert lim2.admit(k, 0.0).headers["x-ratelimit-remaining-requests"] == "8"


def test_fleet_size_change_resizes_existing_buckets() -> None:
    lim = RateLimiter(fleet_size=1)
    k = key(rpm=60)
    assert lim.admit(k, 0.0).allowed            # 59 left of 60
    lim.set_fleet_size(4)                       # now 15 per gateway: level clipped to 15
    assert sum(lim.admit(k, 0.0).allowed for _ in range(20)) == 15
    lim.set_fleet_size(0)                       # never below one gateway
    assert lim.fleet_size == 1


def test_tiny_share_still_admits_one_request() -> None:
    lim = RateLimiter(fleet_size=4)
    k = key(rpm=1)
    assert lim.admit(k, 0.0).allowed
    v = lim.admit(k, 0.0)
    assert not v.allowed and v.retry_after_s == 240     # 0.25/min per gateway


def test_tpm_denies_while_negative_after_charging_usage() -> None:
    lim = RateLimiter()
    k = key(tpm=600)                            # 10 tokens/s
    assert lim.admit(k, 0.0).allowed
    lim.charge_tokens(k, 900, 0.0)              # 600 - 900 = -300
    v = lim.admit(k, 0.0)
    assert not v.allowed and v.kind == TOKENS and v.retry_after_s == 30
    assert v.headers["x-ratelimit-remaining-tokens"] == "0"
    assert not lim.admit(k, 29.0).allowed
    assert lim.admit(k, 30.0).allowed


def test_limits_follow_key_changes_and_forget_removed_keys() -> None:
    lim = RateLimiter()
    assert sum(lim.admit(key(rpm=2), 0.0).allowed for _ in range(5)) == 2
    assert lim.admit(key(rpm=0), 0.0).allowed               # limit removed
    assert sum(lim.admit(key(rpm=5), 0.0).allowed for _ in range(5)) == 0   # level kept (0), capacity 5
    lim.forget(set())
    assert sum(lim.admit(key(rpm=5), 0.0).allowed for _ in range(6)) == 5


def test_format_duration_like_openai() -> None:
    assert format_duration(0.12) == "120ms"
    assert format_duration(1.0) == "1s"
    assert format_duration(360) == "6m0s"
    assert format_duration(61.2) == "1m2s"


def test_rate_limited_error_is_openai_shaped() -> None:
    err = RateLimited("Rate limit reached", kind="tokens", retry_after_s=7, headers={"x-ratelimit-limit-tokens": "5"})
    assert err.status == 429
    assert err.headers == {"Retry-After": "7", "x-ratelimit-limit-tokens": "5"}
    body = error_body(err.message, err.type, err.param, err.code)
    assert orjson.loads(body)["error"] == {"message": "Rate limit reached", "type": "tokens", "param": None,
                                           "code": "rate_limit_exceeded"}


# -- usage book and demand ---------------------------------------------------------------------


def test_usage_book_is_cumulative_and_flushes_only_dirty_entries() -> None:
    book = UsageBook()
    book.record("k1", "m", TokenUsage(3, 4), error=False)
    book.record("k1", "m", None, error=True)
    book.record("k2", "m", TokenUsage(1, 1), error=False)
    recs = {(r.key_id, r.model): r for r in book.take_dirty("gw", 5)}
    assert recs[("k1", "m")] == Usage(key_id="k1", model="m", gateway_id="gw", requests=2, prompt_tokens=3,
                                      completion_tokens=4, errors=1, updated_unix_ms=5)
    assert book.take_dirty("gw", 6) == []
    book.record("k2", "m", TokenUsage(1, 1), error=False)
    (again,) = book.take_dirty("gw", 7)
    assert (again.key_id, again.requests, again.prompt_tokens) == ("k2", 2, 2)
    book.mark_dirty([again])
    assert [r.key_id for r in book.take_dirty("gw", 8)] == ["k2"]


def test_usage_book_seed_continues_counts() -> None:
    book = UsageBook()
    book.seed([Usage(key_id="k", model="m", requests=10, prompt_tokens=5, completion_tokens=6, errors=1)])
    book.record("k", "m", TokenUsage(1, 2), error=False)
    (r,) = book.take_dirty("gw", 0)
    assert (r.requests, r.prompt_tokens, r.completion_tokens, r.errors) == (11, 6, 8, 1)


def test_demand_meter_rates_over_the_window_and_drops_idle_models() -> None:
    meter = DemandMeter(started=0.0, window_s=60)
    for t in range(120):
        meter.arrived("m", float(t))
        meter.finished("m", TokenUsage(10, 20), float(t) + 0.5)
    meter.arrived("m", 120.0)                      # one in flight
    d = meter.snapshot("gw", 120.0, 1)["m"]
    assert d.requests_per_second == pytest.approx(1.0)
    assert d.prompt_tokens_per_second == pytest.approx(59 * 10 / 60)
    assert d.completion_tokens_per_second == pytest.approx(59 * 20 / 60)
    assert d.in_flight == 1 and d.window_seconds == 60 and d.gateway_id == "gw"
    meter.finished("m", None, 121.0)
    assert "m" in meter.snapshot("gw", 121.0, 2)
    assert meter.snapshot("gw", 500.0, 3) == {}     # nothing in the window, nothing in flight


def test_demand_meter_young_gateway_divides_by_its_age() -> None:
    meter = DemandMeter(started=100.0, window_s=60)
    for _ in range(10):
        meter.arrived("m", 104.0)
        meter.finished("m", None, 104.0)
    assert meter.snapshot("gw", 105.0, 0)["m"].requests_per_second == pytest.approx(2.0)


# -- private models ----------------------------------------------------------------------------


def _kv(key: str, spec: ModelSpec | bytes) -> KeyValue:
    value = spec if isinstance(spec, bytes) else spec.SerializeToString()
    return KeyValue(key, value, 1, 1, 1, 0)


def test_private_models_visible_only_to_allowed_owners_and_admins() -> None:
    keys = Keys("/p")
    table = ModelAccessTable()
    private = ModelSpec(name="org/secret", access=ModelAccess(public=False, allowed_owners=["ann"]))
    legacy = ModelSpec(name="old")                    # no access field: public
    table.apply(to_event(Resync({keys.model("org/secret"): _kv(keys.model("org/secret"), private),
                        keys.model("old"): _kv(keys.model("old"), legacy)}, 1), SPECS))
    ann = Principal("a", "ann", ApiKey(key_id="a", owner="ann"))
    bob = Principal("b", "bob", ApiKey(key_id="b", owner="bob"))
    admin = Principal("c", "root", ApiKey(key_id="c", owner="root", admin=True))
    assert table.visible(ann, "org/secret") and table.visible(admin, "org/secret")
    assert not table.visible(bob, "org/secret")
    assert table.visible(ANONYMOUS, "org/secret")     # auth off: everything
    assert table.visible(bob, "old") and table.visible(bob, "unknown")
    assert table.in_catalog("old") and not table.in_catalog("unknown")
    with pytest.raises(ModelNotFound):                  # like an unknown model: existence not leaked
        check_model_access(bob, "org/secret", table)
    limited = Principal("l", "ann", ApiKey(key_id="l", owner="ann", allowed_models=["x"]))
    with pytest.raises(Forbidden):
        check_model_access(limited, "org/secret", table)
    # made public, then deleted
    public = ModelSpec(name="org/secret", access=ModelAccess(public=True))
    table.apply(to_event(Changes((Change(keys.model("org/secret"), _kv(keys.model("org/secret"), public)),), 2), SPECS))
    assert table.visible(bob, "org/secret")
    table.apply(to_event(Changes((Change(keys.model("old"), None),), 3), SPECS))
    assert not table.in_catalog("old")


def test_undecodable_model_record_fails_closed() -> None:
    table = ModelAccessTable()
    table.apply(to_event(Resync({"/p/models/bad": _kv("/p/models/bad", b"\xff\xff\xff")}, 1), SPECS))
    assert not table.visible(Principal("b", "bob", ApiKey(key_id="b", owner="bob")), "bad")
    assert table.private_models() == ["bad"]
