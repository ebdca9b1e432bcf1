"""Rate limits (pure, clock injected), demand meter, private-model access, 429 envelope."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.keys import Keys
from controlplane.pb import ApiKey, ModelAccess, ModelSpec
from controlplane.store import Change, Changes, KeyValue, Resync
from controlplane.store.cache import proto_decoder, to_event
from gateway.auth import ANONYMOUS, ModelAccessTable, Principal, check_model_access
from gateway.errors import Forbidden, ModelNotFound, RateLimited, error_body
from gateway.limits import REQUESTS, TOKENS, PeerLoad, RateLimiter, format_duration, peers_from, quota_of, share_of
from gateway.sse import TokenUsage
from gateway.usage import DemandMeter

SPECS = proto_decoder(ModelSpec)  # what the gateway's cache decodes with


def key(rpm: int = 0, tpm: int = 0, kid: str = "k1") -> ApiKey:
    return ApiKey(key_id=kid, owner="ann", requests_per_minute=rpm, tokens_per_minute=tpm)


# -- limiter: one gateway ----------------------------------------------------------------------


def test_unlimited_key_is_always_allowed_without_headers() -> None:
    lim = RateLimiter()
    v = lim.admit(key(), 0.0)
    assert v.allowed and not v.headers


def test_rpm_is_a_sliding_minute_the_whole_limit_at_once_then_nothing_until_it_leaves() -> None:
    lim = RateLimiter()
    k = key(rpm=6)
    verdicts = [lim.admit(k, 0.2) for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 6 + [False]
    denied = verdicts[-1]
    assert denied.kind == REQUESTS
    assert denied.retry_after_s == 61           # second 0 counts until second 61 (the window never undercounts)
    assert denied.headers["x-ratelimit-limit-requests"] == "6"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    assert verdicts[0].headers["x-ratelimit-remaining-requests"] == "5"
    assert not lim.admit(k, 60.9).allowed
    assert sum(lim.admit(k, 61.0).allowed for _ in range(10)) == 6


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 500), gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=300))
def test_one_gateway_never_admits_more_than_the_limit_in_any_60_s(limit: int, gaps: list[float]) -> None:
    lim = RateLimiter()
    k = key(rpm=limit)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        if lim.admit(k, now).allowed:
            admitted.append(now)
    for i, t in enumerate(admitted):                 # every window [t, t + 60)
        assert sum(1 for u in admitted[i:] if u < t + 60) <= limit


def test_a_greedy_client_gets_the_whole_limit_every_minute() -> None:
    lim = RateLimiter()
    k = key(rpm=120)
    times = [i * 0.05 for i in range(int(180 / 0.05))]
    got = [t for t in times if lim.admit(k, t).allowed]
    for start in (0, 61, 122):
        assert sum(1 for t in got if start <= t < start + 61) == 120


def test_cold_start_takes_one_nth_until_demand_is_published() -> None:
    lim = RateLimiter(fleet_size=2)
    k = key(rpm=10)
    assert sum(lim.admit(k, 0.0).allowed for _ in range(10)) == 5
    lim.set_published({"k1": (1.0, 0.0)})           # we published demand; nobody else did: share 1
    assert sum(lim.admit(k, 1.0).allowed for _ in range(10)) == 5
    assert not lim.admit(k, 1.0).allowed


def test_shares_follow_published_demand_and_others_admissions_cap_them() -> None:
    lim = RateLimiter(fleet_size=3)
    k = key(rpm=100)
    lim.set_published({"k1": (3.0, 0.0)})
    lim.set_peers({"k1": PeerLoad(admitted_requests=10, request_demand=1.0)})
    assert share_of(3.0, 1.0, 3, asking=True) == pytest.approx(0.75)
    assert sum(lim.admit(k, 0.0).allowed for _ in range(100)) == 75
    # another gateway admitted 50 meanwhile: only 100 - 50 - 75 < 0 left, nothing more here
    lim.set_peers({"k1": PeerLoad(admitted_requests=50, request_demand=1.0)})
    v = lim.admit(k, 1.0)
    assert not v.allowed and v.headers["x-ratelimit-remaining-requests"] == "0"
    assert quota_of(100, 0.75, 50) == 50


def test_a_gateway_new_to_a_key_gets_at_least_one_nth_capped_by_what_others_used() -> None:
    assert share_of(0.0, 5.0, 4, asking=True) == pytest.approx(0.25)
    assert share_of(0.0, 5.0, 4, asking=False) == 0.0
    lim = RateLimiter(fleet_size=4)
    lim.set_peers({"k1": PeerLoad(admitted_requests=95, request_demand=5.0)})
    assert sum(lim.admit(key(rpm=100), 0.0).allowed for _ in range(20)) == 5


def test_stale_view_falls_back_to_a_static_share() -> None:
    lim = RateLimiter(fleet_size=4)
    lim.set_published({"k1": (9.0, 0.0)})
    lim.set_peers({"k1": PeerLoad(admitted_requests=0, request_demand=0.0)})
    assert sum(lim.admit(key(rpm=100), 0.0, fresh=False).allowed for _ in range(100)) == 25


def test_limit_below_the_fleet_size_still_admits_one_request_per_gateway() -> None:
    lim = RateLimiter(fleet_size=4)
    k = key(rpm=1)
    assert lim.admit(k, 0.0).allowed
    v = lim.admit(k, 0.0)
    assert not v.allowed and v.retry_after_s == 61
    other = RateLimiter(fleet_size=4)
    other.set_peers({"k1": PeerLoad(admitted_requests=1, request_demand=1.0)})
    assert not other.admit(k, 0.0).allowed          # the others used the whole limit already


def test_tpm_denies_once_the_window_holds_the_limit_and_a_response_may_overdraw() -> None:
    lim = RateLimiter()
    k = key(tpm=600)
    assert lim.admit(k, 0.0).allowed
    lim.charge_tokens(k, 900, 0.5)                  # one response overdraws
    v = lim.admit(k, 1.0)
    assert not v.allowed and v.kind == TOKENS and v.retry_after_s == 60
    assert v.headers["x-ratelimit-remaining-tokens"] == "0"
    assert not lim.admit(k, 60.5).allowed
    assert lim.admit(k, 61.0).allowed


def test_loads_report_the_window_and_demand_and_forget_idle_keys() -> None:
    lim = RateLimiter()
    k = key(rpm=5, tpm=1000)
    for i in range(8):
        if lim.admit(k, 100.0 + i * 0.1).allowed:
            lim.charge_tokens(k, 20, 100.0 + i * 0.1)
    (load,) = lim.loads(101.0)
    assert (load.key_id, load.admitted_requests, load.admitted_tokens) == ("k1", 5, 100)
    assert load.request_demand == pytest.approx(0.8)            # 8 asked over 10 s
    assert load.token_demand == pytest.approx(0.8 * 20)
    assert lim.loads(500.0) == []                                # empty window: forgotten
    assert peers_from([[load], [load]])["k1"] == PeerLoad(10, 200, 1.6, 32.0)


def test_forget_removed_keys() -> None:
    lim = RateLimiter()
    assert sum(lim.admit(key(rpm=2), 0.0).allowed for _ in range(5)) == 2
    assert lim.admit(key(rpm=0), 0.0).allowed               # limit removed
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


# -- demand ----------------------------------------------------------------------------------


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
