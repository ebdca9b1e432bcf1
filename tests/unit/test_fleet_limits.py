"""Fleet-wide rate limits in a simulated fleet (pure: every gateway's RateLimiter, a publication board
with lag, simulated clients): the ±10 % bound of docs/gateway.md over every 60 s window."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.pb import ApiKey, KeyLoad
from gateway.limits import RateLimiter, peers_from

DT = 0.05


@dataclass
class Member:
    limiter: RateLimiter
    phase: float
    board: list[tuple[float, list[KeyLoad]]] = field(default_factory=list)   # (visible from, loads)


def simulate(n: int, limit: int, weights_before: list[float], weights_after: list[float], switch_at: float,
             rate: float, seconds: float, *, publish_s: float = 2.0, lag_s: float = 0.1, tpm: bool = False,
             tokens_per_request: int = 50, seed: int = 0) -> list[tuple[float, int]]:
    """Admitted (time, cost) of one key's traffic over ``n`` gateways; clients pick gateways by weight."""
    rng = random.Random(seed)
    key = ApiKey(key_id="k", requests_per_minute=0 if tpm else limit, tokens_per_minute=limit if tpm else 0)
    members = [Member(RateLimiter(fleet_size=n), phase=rng.uniform(0, publish_s)) for _ in range(n)]
    next_publish = [m.phase for m in members]
    admitted: list[tuple[float, int]] = []
    t, owed = 0.0, 0.0
    while t < seconds:
        for i, m in enumerate(members):          # publications, seen by the others after lag_s
            if t >= next_publish[i]:
                loads = m.limiter.loads(t)
                m.board.append((t + lag_s, loads))
                m.limiter.set_published({kl.key_id: (kl.request_demand, kl.token_demand) for kl in loads})
                next_publish[i] += publish_s
        for i, m in enumerate(members):
            visible = []
            for j, other in enumerate(members):
                if j != i:
                    seen = [loads for at, loads in other.board if at <= t]
                    if seen:
                        visible.append(seen[-1])
            m.limiter.set_peers(peers_from(visible))
        owed += rate * DT
        weights = weights_before if t < switch_at else weights_after
        if sum(weights) <= 0:
            weights = [1.0] * n
        while owed >= 1:
            owed -= 1
            i = rng.choices(range(n), weights)[0]
            lim = members[i].limiter
            if lim.admit(key, t).allowed:
                cost = tokens_per_request if tpm else 1
                if tpm:
                    lim.charge_tokens(key, cost, t)
                admitted.append((t, cost))
        t = round(t + DT, 6)
    return admitted


def worst_window(admitted: list[tuple[float, int]], start_after: float = 1.0) -> int:
    """The most admitted (cost) in any 60 s window starting at or after ``start_after``."""
    best = 0
    times = [a for a, _ in admitted]
    for i, t in enumerate(times):
        if t < start_after:
            continue
        best = max(best, sum(c for u, c in admitted[i:] if u < t + 60))
    # windows that start between admissions hold a suffix of a later window: covered above, except
    # the window that starts at start_after itself
    best = max(best, sum(c for u, c in admitted if start_after <= u < start_after + 60))
    return best


weights = st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 4), limit=st.integers(60, 600), before=weights, after=weights,
       switch_at=st.floats(0, 120), overload=st.floats(1.5, 6), seed=st.integers(0, 10_000))
def test_the_fleet_never_admits_more_than_110_percent_in_any_minute(n: int, limit: int, before: list[float],
                                                                      after: list[float], switch_at: float,
                                                                      overload: float, seed: int) -> None:
    admitted = simulate(n, limit, before[:n], after[:n], switch_at, rate=overload * limit / 60, seconds=150,
                        seed=seed)
    assert worst_window(admitted) <= 1.1 * limit


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 4), limit=st.integers(2000, 20000), before=weights, after=weights,
       switch_at=st.floats(0, 120), seed=st.integers(0, 10_000))
def test_tokens_per_minute_hold_for_the_fleet_too(n: int, limit: int, before: list[float], after: list[float],
                                                  switch_at: float, seed: int) -> None:
    per_request = 50
    admitted = simulate(n, limit, before[:n], after[:n], switch_at, rate=3 * limit / 60 / per_request, seconds=150,
                        tpm=True, tokens_per_request=per_request, seed=seed)
    # one response may overdraw each gateway's window: the bound is 110 % plus one request per gateway
    assert worst_window(admitted) <= 1.1 * limit + n * per_request


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 4), limit=st.integers(60, 600), target=st.integers(0, 3), seed=st.integers(0, 10_000))
def test_a_key_on_one_gateway_gets_at_least_90_percent(n: int, limit: int, target: int, seed: int) -> None:
    w = [0.0] * n
    w[target % n] = 1.0
    admitted = simulate(n, limit, w, w, 0.0, rate=3 * limit / 60, seconds=130, seed=seed)
    for start in (0.0, 61.0):
        got = sum(c for t, c in admitted if start <= t < start + 60)
        assert got >= 0.9 * limit, (start, got)
