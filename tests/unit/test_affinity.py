"""Session affinity: rendezvous hashing over READY instances, P2C fallback (pure, seeded)."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.pb import InstanceState
from gateway.routing import affinity_target, overloaded, pick_affinity
from gateway.table import Endpoint


def ep(iid: str, weight: float = 1.0) -> Endpoint:
    return Endpoint(instance_id=iid, model="m", url=f"http://h/{iid}", state=InstanceState.READY, weight=weight,
                    max_concurrency=0, node_id="n", gpu_type="g", owner="o")


instance_ids = st.lists(st.text("abcdefghij0123", min_size=1, max_size=6), min_size=2, max_size=10, unique=True)
sessions = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)


@settings(max_examples=200, deadline=None)
@given(ids=instance_ids, sessions=sessions, data=st.data())
def test_removing_an_instance_remaps_only_its_sessions(ids: list[str], sessions: list[str],
                                                       data: st.DataObject) -> None:
    cands = [ep(i) for i in ids]
    gone = data.draw(st.sampled_from(ids))
    rest = [c for c in cands if c.instance_id != gone]
    for s in sessions:
        before = affinity_target(cands, s)
        after = affinity_target(rest, s)
        assert before is not None and after is not None
        if before.instance_id != gone:
            assert after.instance_id == before.instance_id


@settings(max_examples=200, deadline=None)
@given(ids=instance_ids, sessions=sessions, data=st.data())
def test_adding_an_instance_only_moves_sessions_to_it(ids: list[str], sessions: list[str],
                                                      data: st.DataObject) -> None:
    cands = [ep(i) for i in ids]
    new = ep("new-" + data.draw(st.text("xyz", min_size=1, max_size=3)))
    for s in sessions:
        before = affinity_target(cands, s)
        after = affinity_target([*cands, new], s)
        assert after is not None and before is not None
        assert after.instance_id in (before.instance_id, new.instance_id)


@given(ids=instance_ids, session=st.text(min_size=1))
def test_target_does_not_depend_on_candidate_order(ids: list[str], session: str) -> None:
    cands = [ep(i) for i in ids]
    shuffled = cands[::-1]
    assert affinity_target(cands, session) == affinity_target(shuffled, session)


def test_sessions_spread_in_proportion_to_weight() -> None:
    cands = [ep("a", 1.0), ep("b", 1.0), ep("c", 2.0)]
    counts = Counter(affinity_target(cands, f"s{i}").instance_id for i in range(8000))  # type: ignore[union-attr]
    assert 0.45 < counts["c"] / 8000 < 0.55
    assert 0.2 < counts["a"] / 8000 < 0.3


def test_affinity_sticks_until_the_instance_is_overloaded() -> None:
    cands = [ep(f"i{k}") for k in range(4)]
    rng = random.Random(1)
    target = affinity_target(cands, "conv-1")
    assert target is not None
    assert {pick_affinity(cands, {}, "conv-1", rand=rng.random) for _ in range(50)} == {target}
    busy = {target.instance_id: 8}                       # 8 vs 2 * mean (8/4) + slack 4 = 8: not above
    assert not overloaded(target, cands, busy)
    assert pick_affinity(cands, busy, "conv-1", rand=rng.random) == target
    busier = {target.instance_id: 9}                     # 9 > 2 * 9/4 + 4 = 8.5
    assert overloaded(target, cands, busier)
    picks = {pick_affinity(cands, busier, "conv-1", rand=rng.random) for _ in range(50)}
    assert target not in picks                           # P2C never prefers the overloaded one


def test_retry_and_no_session_use_p2c() -> None:
    cands = [ep(f"i{k}") for k in range(3)]
    target = affinity_target(cands, "s")
    assert target is not None
    rng = random.Random(2)
    picks = {pick_affinity(cands, {}, "s", exclude={target.instance_id}, rand=rng.random) for _ in range(50)}
    assert target not in picks and len(picks) == 2
    assert len({pick_affinity(cands, {}, None, rand=rng.random) for _ in range(100)}) == 3
    assert pick_affinity([], {}, "s") is None
    assert pick_affinity(cands[:1], {"i0": 100}, "s") == cands[0]
