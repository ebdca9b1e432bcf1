"""The routing table through an etcd outage: recently known models, lingering endpoints, bounds."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store import Change, Changes, KeyValue, Resync
from controlplane.store.cache import proto_decoder, to_event
from gateway.table import RoutingTable

INST = proto_decoder(InstanceRecord)
_rev = itertools.count(1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def kv(iid: str, model: str = "m", state: InstanceState = InstanceState.READY) -> KeyValue:
    rec = InstanceRecord(instance_id=iid, model=model, node_id="n", endpoint=f"http://h:{len(iid)}", state=state)
    rev = next(_rev)
    return KeyValue(f"/p/instances/{model}/{iid}", rec.SerializeToString(), rev, rev, 1, 0)


def replace(table: RoutingTable, *kvs: KeyValue) -> None:
    table.apply(to_event(Resync({k.key: k for k in kvs}, next(_rev)), INST))


def delete(table: RoutingTable, *keys: str) -> None:
    table.apply(to_event(Changes(tuple(Change(k, None) for k in keys), next(_rev)), INST))


def test_a_model_whose_instances_vanished_stays_known_for_a_while() -> None:
    clock = Clock()
    table = RoutingTable(remember_s=60, clock=clock)
    a = kv("a")
    replace(table, a)
    delete(table, a.key)
    assert table.ready("m") == () and table.known("m")       # 503 "retry", not 404
    clock.now += 59
    assert table.known("m")
    clock.now += 2
    assert not table.known("m")
    assert not table.known("never-seen")


def test_the_memory_of_gone_models_is_bounded() -> None:
    clock = Clock()
    table = RoutingTable(remember_s=3600, max_remembered=5, clock=clock)
    for i in range(20):
        replace(table, kv(f"i{i}", f"model-{i}"))
        clock.now += 1
    replace(table)
    assert len(table._gone) <= 5
    assert table.known("model-19") and not table.known("model-0")


def test_a_model_that_came_back_is_not_remembered_as_gone() -> None:
    clock = Clock()
    table = RoutingTable(remember_s=10, clock=clock)
    a = kv("a")
    replace(table, a)
    delete(table, a.key)
    replace(table, kv("b"))
    assert "m" not in table._gone and table.known("m")


def test_instances_that_vanish_during_an_outage_linger_as_a_last_resort() -> None:
    clock = Clock()
    table = RoutingTable(clock=clock)
    a, b, s = kv("a"), kv("b"), kv("s", state=InstanceState.STARTING)
    replace(table, a, b, s)
    table.hold_removals(float("inf"))             # etcd unreachable
    clock.now += 30
    table.hold_removals(clock.now + 20)           # etcd back: every lease expired at once
    delete(table, a.key, b.key, s.key)
    assert [e.instance_id for e in table.ready("m")] == ["a", "b"]   # STARTING never lingers
    assert table.models() == []                   # not listed as READY: only a last resort
    replace(table, kv("a"))                       # the agent re-registered: the real record wins
    assert [e.instance_id for e in table.ready("m")] == ["a"]
    delete(table, "/p/instances/m/a")             # still within the grace: b and a linger
    assert sorted(e.instance_id for e in table.ready("m")) == ["a", "b"]
    clock.now += 21                               # grace over
    assert table.ready("m") == ()
    delete(table, "/p/instances/m/nothing")
    assert table.ready("m") == ()


def test_without_an_outage_a_vanished_instance_is_gone_at_once() -> None:
    clock = Clock()
    table = RoutingTable(clock=clock)
    a = kv("a")
    replace(table, a)
    delete(table, a.key)
    assert table.ready("m") == ()


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=30))
def test_real_ready_instances_always_beat_lingering_ones(ops: list[tuple[str, bool]]) -> None:
    clock = Clock()
    table = RoutingTable(clock=clock)
    table.hold_removals(float("inf"))
    live: set[str] = set()
    for iid, present in ops:
        if present:
            table.apply(to_event(Changes((Change(f"/p/instances/m/{iid}", kv(iid)),), next(_rev)), INST))
            live.add(iid)
        else:
            delete(table, f"/p/instances/m/{iid}")
            live.discard(iid)
        got = {e.instance_id for e in table.ready("m")}
        if live:
            assert got == live
