"""The gateway's pure parts: P2C pick, RoutingTable, Ejections, KeyTable, request parsing, header
filtering, and the agent's in-flight parser. No network, no clock: clocks are injected."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from agent.supervisor import parse_in_flight
from controlplane.pb import ApiKey, InstanceRecord, InstanceState
from controlplane.store import Change, Changes, KeyValue, Resync
from controlplane.store.cache import proto_decoder, to_event
from gateway.auth import ANONYMOUS, KeyTable, Principal, check_model_access, key_hash, new_api_key
from gateway.ejection import Ejections
from gateway.errors import BadRequest, Forbidden, Unauthorized
from gateway.proxy import parse_model, response_headers, upstream_headers
from gateway.routing import pick
from gateway.server import Request
from gateway.table import Endpoint, RoutingTable

INST = proto_decoder(InstanceRecord)  # what the gateway's cache decodes with
KEYS = proto_decoder(ApiKey)  # what the gateway's cache decodes with

READY, STARTING, DRAINING, FAILED = (InstanceState.READY, InstanceState.STARTING, InstanceState.DRAINING,
                                     InstanceState.FAILED)


def endpoint(iid: str, weight: float = 1.0, model: str = "m", state: int = READY) -> Endpoint:
    return Endpoint(instance_id=iid, model=model, url=f"http://10.0.0.1:{8000 + len(iid)}", state=state,
                    weight=weight, max_concurrency=0, node_id="n1", gpu_type="a100", owner="alice")


# -- pick ------------------------------------------------------------------------------------------

ids = st.lists(st.text("abcdefgh", min_size=1, max_size=4), unique=True, max_size=8)


@settings(max_examples=300, deadline=None)
@given(ids=ids, data=st.data(), seed=st.integers(0, 2**32))
def test_pick_never_returns_excluded_or_absent(ids: list[str], data: st.DataObject, seed: int) -> None:
    weights = data.draw(st.lists(st.floats(0.1, 8.0), min_size=len(ids), max_size=len(ids)))
    cands = [endpoint(i, w) for i, w in zip(ids, weights, strict=True)]
    known = [*ids, "zz-absent"]
    in_flight = data.draw(st.dictionaries(st.sampled_from(known), st.integers(0, 50)))
    exclude = data.draw(st.sets(st.sampled_from(known)) if known else st.just(set()))
    rng = random.Random(seed)
    got = pick(cands, in_flight, exclude=exclude, rand=rng.random)
    usable = [c for c in cands if c.instance_id not in exclude]
    if not usable:
        assert got is None
    else:
        assert got is not None and got in usable


@given(rand_values=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=2, max_size=2),
       loads=st.lists(st.integers(0, 9), min_size=2, max_size=6))
def test_pick_takes_the_less_loaded_of_the_two_drawn(rand_values: list[float], loads: list[int]) -> None:
    cands = [endpoint(f"i{k}") for k in range(len(loads))]
    in_flight = {c.instance_id: n for c, n in zip(cands, loads, strict=True)}
    values = iter(rand_values)
    got = pick(cands, in_flight, rand=lambda: next(values))
    assert got is not None
    # Reproduce the two draws to know which pair was compared.
    n = len(cands)
    i = int(rand_values[0] * n) % n
    j = int(rand_values[1] * (n - 1)) % (n - 1)
    j += j >= i
    assert got in (cands[i], cands[j])
    assert in_flight[got.instance_id] == min(loads[i], loads[j])


def test_pick_none_only_when_nothing_usable() -> None:
    assert pick([], {}) is None
    a = endpoint("a")
    assert pick([a], {"a": 1000}) is a
    assert pick([a], {}, exclude={"a"}) is None
    assert pick([a, endpoint("b")], {}, exclude={"a", "b"}) is None


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 12), others=st.lists(st.integers(0, 5), min_size=12, max_size=12),
       seed=st.integers(0, 2**32))
def test_a_heavily_loaded_instance_is_rarely_picked(n: int, others: list[int], seed: int) -> None:
    cands = [endpoint(f"i{k:02d}") for k in range(n)]
    in_flight = {c.instance_id: others[k] for k, c in enumerate(cands)}
    hot = cands[seed % n].instance_id
    in_flight[hot] = 100
    rng = random.Random(seed)
    rounds = 2000
    counts = Counter(ep.instance_id for ep in (pick(cands, in_flight, rand=rng.random) for _ in range(rounds))
                     if ep is not None)
    assert sum(counts.values()) == rounds
    assert counts[hot] < rounds / n / 10  # uniform would give rounds / n
    # Everyone else still gets traffic (no herding onto one instance).
    assert all(counts[c.instance_id] > 0 for c in cands if c.instance_id != hot)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32), light=st.integers(1, 2))
def test_weights_are_respected_when_load_tracks_picks(seed: int, light: int) -> None:
    heavy = endpoint("heavy", weight=3.0)
    cands = [heavy] + [endpoint(f"light{k}", weight=1.0) for k in range(light)]
    in_flight: dict[str, int] = {}
    rng = random.Random(seed)
    for _ in range(3000):  # requests that never finish: load == picks so far
        ep = pick(cands, in_flight, rand=rng.random)
        assert ep is not None
        in_flight[ep.instance_id] = in_flight.get(ep.instance_id, 0) + 1
    mean_light = sum(in_flight.get(f"light{k}", 0) for k in range(light)) / light
    assert 2.5 <= in_flight["heavy"] / mean_light <= 3.5


def test_traffic_follows_capacity_with_requests_finishing() -> None:
    """Closed loop: 16 outstanding requests; each step one finishes, on a busy instance chosen with
    probability proportional to its weight (a weight-3 instance serves 3x as fast). Picks must keep
    both busy, so the fast one ends up with ~3x the traffic."""
    heavy, light = endpoint("heavy", weight=3.0), endpoint("light", weight=1.0)
    cands = [heavy, light]
    rng = random.Random(1)
    outstanding: list[str] = []
    picks: Counter[str] = Counter()
    for step in range(6000):
        ep = pick(cands, Counter(outstanding), rand=rng.random)
        assert ep is not None
        outstanding.append(ep.instance_id)
        if step >= 500:
            picks[ep.instance_id] += 1
        if len(outstanding) > 16:
            busy = sorted(set(outstanding))
            done = rng.choices(busy, [3.0 if iid == "heavy" else 1.0 for iid in busy])[0]
            outstanding.remove(done)
    assert 2.5 <= picks["heavy"] / picks["light"] <= 3.5


# -- RoutingTable ----------------------------------------------------------------------------------

_rev = iter(range(1, 1_000_000))


def instance_kv(iid: str, model: str = "m", state: InstanceState = READY, endpoint_url: str = "http://h:1/",
                weight: float = 0.0) -> KeyValue:
    rec = InstanceRecord(instance_id=iid, model=model, node_id="n1", endpoint=endpoint_url, state=state,
                         engine="sim", capacity_weight=weight, max_concurrency=8)
    rev = next(_rev)
    return KeyValue(key=f"/p/instances/{model}/{iid}", value=rec.SerializeToString(), create_revision=rev,
                    mod_revision=rev, version=1, lease=0)


def resync(*kvs: KeyValue, revision: int = 10) -> Resync:
    return Resync({kv.key: kv for kv in kvs}, revision)


def test_resync_replaces_everything() -> None:
    table = RoutingTable(prefix="/p")
    assert not table.loaded and table.models() == []
    table.apply(to_event(resync(instance_kv("a1", "alpha"), instance_kv("a2", "alpha"), instance_kv("b1", "beta")),
                         INST))
    assert table.loaded and table.revision == 10 and len(table) == 3
    assert [e.instance_id for e in table.ready("alpha")] == ["a1", "a2"]
    table.apply(to_event(resync(instance_kv("c1", "gamma"), revision=20), INST))
    assert table.revision == 20 and len(table) == 1
    assert table.models() == ["gamma"] and table.ready("alpha") == ()
    assert table.known("alpha")  # recently seen: unavailable (503), not unknown (tests/unit/test_table_outage.py)


def test_changes_patch_and_delete() -> None:
    table = RoutingTable(prefix="/p")
    a1, a2 = instance_kv("a1"), instance_kv("a2")
    table.apply(to_event(resync(a1, a2), INST))
    table.apply(to_event(Changes((Change(a1.key, instance_kv("a1", state=DRAINING)),), 11), INST))
    assert [e.instance_id for e in table.ready("m")] == ["a2"]
    assert table.known("m") and len(table) == 2 and table.revision == 11
    table.apply(to_event(Changes((Change(a2.key, None), Change("/p/instances/m/never-existed", None)), 12), INST))
    assert table.ready("m") == () and table.models() == [] and len(table) == 1
    table.apply(to_event(Changes((Change(a1.key, instance_kv("a1", state=READY)),), 13), INST))
    assert [e.instance_id for e in table.ready("m")] == ["a1"]


def test_only_ready_is_routable() -> None:
    table = RoutingTable(prefix="/p")
    states = (STARTING, READY, DRAINING, FAILED, InstanceState.INSTANCE_STATE_UNSPECIFIED)
    table.apply(to_event(resync(*(instance_kv(f"i{s}", state=s) for s in states)), INST))
    assert [e.instance_id for e in table.ready("m")] == [f"i{READY}"]
    assert len(table.all()) == 5
    assert all(e.ready == (e.state == READY) for e in table.all())


def test_undecodable_and_incomplete_records_are_skipped() -> None:
    table = RoutingTable(prefix="/p")
    good = instance_kv("good")
    garbage = KeyValue("/p/instances/m/bad", b"\xff\xff\xff", 1, 1, 1, 0)
    no_endpoint = instance_kv("noep", endpoint_url="")
    table.apply(to_event(resync(good, garbage, no_endpoint), INST))
    assert [e.instance_id for e in table.all()] == ["good"]
    # A record that turns into garbage is dropped, not kept stale.
    table.apply(to_event(Changes((Change(good.key, KeyValue(good.key, b"\x0f", 2, 2, 2, 0)),), 11), INST))
    assert len(table) == 0 and table.ready("m") == ()


def test_models_sorted_and_endpoint_view() -> None:
    table = RoutingTable(prefix="/p")
    table.apply(to_event(resync(*(instance_kv(f"x{m}", m) for m in ("zeta", "alpha", "mu")),
                       instance_kv("y", "omega", state=STARTING)), INST))
    assert table.models() == ["alpha", "mu", "zeta"]
    assert table.known("omega") and not table.ready("omega")
    table.apply(to_event(resync(instance_kv("w", "m", endpoint_url="http://h:9/", weight=2.5), instance_kv("z", "m")),
                         INST))
    by_id = {e.instance_id: e for e in table.all()}
    assert by_id["w"].url == "http://h:9" and by_id["w"].weight == 2.5
    assert by_id["z"].weight == 1.0  # 0 in the record means "treat as 1"


ops = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(["m1", "m2"]),
                         st.sampled_from([None, STARTING, READY, DRAINING, FAILED])), max_size=30)


@given(ops=ops)
def test_table_matches_a_model_of_the_records(ops: list[tuple[str, str, InstanceState | None]]) -> None:
    """Any sequence of puts/deletes: ready sets equal READY records, grouped by model, sorted."""
    table = RoutingTable(prefix="/p")
    table.apply(to_event(Resync({}, 1), INST))
    expected: dict[str, tuple[str, InstanceState]] = {}  # key -> (model, state)
    for rev, (iid, model, state) in enumerate(ops, start=2):
        key = f"/p/instances/{model}/{iid}"
        if state is None:
            table.apply(to_event(Changes((Change(key, None),), rev), INST))
            expected.pop(key, None)
        else:
            table.apply(to_event(Changes((Change(key, instance_kv(iid, model, state)),), rev), INST))
            expected[key] = (model, state)
    want: dict[str, list[str]] = {}
    for key, (model, state) in sorted(expected.items()):
        if state == READY:
            want.setdefault(model, []).append(key.rsplit("/", 1)[1])
    assert table.models() == sorted(want)
    for model in ("m1", "m2"):
        assert [e.instance_id for e in table.ready(model)] == want.get(model, [])
    assert len(table) == len(expected)


# -- Ejections -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ejection_windows_double_up_to_the_cap() -> None:
    clock = FakeClock()
    ej = Ejections(threshold=1, base_s=1.0, max_s=10.0, clock=clock)
    windows = []
    for _ in range(6):
        assert ej.failed("a") is True
        windows.append(ej.remaining("a"))
        assert ej.ejected("a") and ej.count_ejected() == 1
        clock.now += windows[-1] - 0.001
        assert ej.ejected("a")
        clock.now += 0.001
        assert not ej.ejected("a") and ej.remaining("a") == 0.0 and ej.count_ejected() == 0
    assert windows == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_failure_during_window_does_not_extend_it() -> None:
    clock = FakeClock()
    ej = Ejections(threshold=1, base_s=1.0, clock=clock)
    assert ej.failed("a")
    clock.now += 0.5
    assert ej.failed("a") is False
    assert ej.remaining("a") == pytest.approx(0.5)


def test_threshold_counts_consecutive_failures_and_success_resets() -> None:
    clock = FakeClock()
    ej = Ejections(threshold=3, base_s=2.0, clock=clock)
    assert [ej.failed("a") for _ in range(2)] == [False, False]
    ej.succeeded("a")
    assert [ej.failed("a") for _ in range(3)] == [False, False, True]
    assert ej.remaining("a") == 2.0
    clock.now += 2.0
    assert [ej.failed("a") for _ in range(3)] == [False, False, True]
    assert ej.remaining("a") == 4.0
    ej.succeeded("a")  # a success ends the ejection and forgets the history
    assert not ej.ejected("a")
    assert [ej.failed("a") for _ in range(3)] == [False, False, True]
    assert ej.remaining("a") == 2.0


def test_filter_skips_ejected_but_returns_all_when_all_are() -> None:
    clock = FakeClock()
    ej = Ejections(threshold=1, clock=clock)
    a, b, c = endpoint("a"), endpoint("b"), endpoint("c")
    assert ej.filter((a, b, c)) == (a, b, c)
    ej.failed("a")
    assert ej.filter((a, b, c)) == (b, c)
    ej.failed("b")
    ej.failed("c")
    assert ej.filter((a, b, c)) == (a, b, c)
    assert ej.count_ejected() == 3
    ej.forget_missing({"b"})
    assert ej.filter((a, b, c)) == (a, c) and not ej.ejected("a")
    clock.now += 60
    assert ej.filter((a, b, c)) == (a, b, c)


# -- KeyTable / Principal --------------------------------------------------------------------------

NOW = 1_700_000_000


def key_kv(key: str, **fields: object) -> KeyValue:
    rec = ApiKey(key_id=fields.pop("key_id", "k-" + key[-4:]), owner=fields.pop("owner", "bob"),  # type: ignore[arg-type]
                 **fields)  # type: ignore[arg-type]
    return KeyValue(f"/p/keys/{key_hash(key)}", rec.SerializeToString(), 1, 1, 1, 0)


@pytest.fixture
def keys() -> dict[str, str]:
    return {name: new_api_key() for name in ("good", "revoked", "expired", "future", "limited", "admin", "bad")}


@pytest.fixture
def table(keys: dict[str, str]) -> KeyTable:
    t = KeyTable()
    t.apply(to_event(Resync({kv.key: kv for kv in (
        key_kv(keys["good"], key_id="good-id", owner="alice"),
        key_kv(keys["revoked"], revoked=True),
        key_kv(keys["expired"], expires_unix=NOW),
        key_kv(keys["future"], expires_unix=NOW + 1),
        key_kv(keys["limited"], allowed_models=["m1", "m2"]),
        key_kv(keys["admin"], allowed_models=["m1"], admin=True),
        KeyValue(f"/p/keys/{key_hash(keys['bad'])}", b"\xff\xff", 1, 1, 1, 0),
    )}, 5), KEYS))
    return t


def test_new_keys_are_unique_and_hashed() -> None:
    a, b = new_api_key(), new_api_key()
    assert a != b and a.startswith("mp-") and len(a) >= 40
    assert len(key_hash(a)) == 64 and key_hash(a) != key_hash(b) and key_hash(a) == key_hash(a)


@pytest.mark.parametrize("header, reason", [
    (None, "missing"),
    ("", "missing"),
    ("Basic dXNlcjpwYXNz", "malformed"),
    ("Bearer", "malformed"),
    ("Bearer    ", "malformed"),
    ("Bearer mp-not-a-real-key", "invalid"),
])
def test_authenticate_rejects(table: KeyTable, header: str | None, reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason) as info:
        table.authenticate(header, now=NOW)
    assert info.value.status == 401


def test_authenticate_revoked_expired_and_undecodable(table: KeyTable, keys: dict[str, str]) -> None:
    assert len(table) == 6  # the undecodable record was skipped
    with pytest.raises(Unauthorized, match="revoked"):
        table.authenticate(f"Bearer {keys['revoked']}", now=NOW)
    with pytest.raises(Unauthorized, match="expired"):
        table.authenticate(f"Bearer {keys['expired']}", now=NOW)
    with pytest.raises(Unauthorized, match="invalid"):
        table.authenticate(f"Bearer {keys['bad']}", now=NOW)
    assert table.authenticate(f"Bearer {keys['future']}", now=NOW).owner == "bob"
    with pytest.raises(Unauthorized, match="expired"):
        table.authenticate(f"Bearer {keys['future']}", now=NOW + 1)


def test_authenticate_good_key(table: KeyTable, keys: dict[str, str]) -> None:
    for header in (f"Bearer {keys['good']}", f"bearer {keys['good']}", f"Bearer  {keys['good']} "):
        p = table.authenticate(header, now=NOW)
        assert (p.key_id, p.owner) == ("good-id", "alice")
        assert p.record is not None and p.may_use("anything")
    # A wrong key that differs in one character is unknown.
    with pytest.raises(Unauthorized):
        table.authenticate(f"Bearer {keys['good'][:-1]}{'A' if keys['good'][-1] != 'A' else 'B'}", now=NOW)


def test_key_changes_apply(table: KeyTable, keys: dict[str, str]) -> None:
    good_key = f"/p/keys/{key_hash(keys['good'])}"
    table.apply(to_event(Changes((Change(good_key, key_kv(keys["good"], revoked=True)),), 6), KEYS))
    with pytest.raises(Unauthorized, match="revoked"):
        table.authenticate(f"Bearer {keys['good']}", now=NOW)
    table.apply(to_event(Changes((Change(good_key, None),), 7), KEYS))
    with pytest.raises(Unauthorized, match="invalid"):
        table.authenticate(f"Bearer {keys['good']}", now=NOW)
    fresh = new_api_key()
    table.apply(to_event(Changes((Change(f"/p/keys/{key_hash(fresh)}", key_kv(fresh, key_id="fresh")),), 8), KEYS))
    assert table.authenticate(f"Bearer {fresh}", now=NOW).key_id == "fresh"


def test_principal_may_use(table: KeyTable, keys: dict[str, str]) -> None:
    limited = table.authenticate(f"Bearer {keys['limited']}", now=NOW)
    assert limited.may_use("m1") and limited.may_use("m2") and not limited.may_use("m3")
    with pytest.raises(Forbidden) as info:
        check_model_access(limited, "m3")
    assert info.value.status == 403 and info.value.param == "model"
    check_model_access(limited, "m1")
    admin = table.authenticate(f"Bearer {keys['admin']}", now=NOW)
    assert admin.may_use("m3")
    assert ANONYMOUS.may_use("anything")
    assert Principal("k", "o", ApiKey()).may_use("anything")


# -- parse_model / upstream_headers ----------------------------------------------------------------


@pytest.mark.parametrize("body, reason", [
    (b"", "empty"),
    (b"{nope", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"model"', "JSON object"),
    (b"{}", "'model' is required"),
    (b'{"model": 3}', "'model' is required"),
    (b'{"model": ""}', "'model' is required"),
    (b'{"model": null}', "'model' is required"),
])
def test_parse_model_errors(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason) as info:
        parse_model(body)
    assert info.value.status == 400


def test_parse_model_ok() -> None:
    model, payload = parse_model(b'{"model": "llama", "messages": [], "stream": true}')
    assert model == "llama" and payload == {"model": "llama", "messages": [], "stream": True}


def test_upstream_headers_drop_credentials_and_hop_by_hop() -> None:
    headers = [(n.encode(), v.encode()) for n, v in [
        ("Authorization", "Bearer mp-secret"), ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"), ("Host", "gateway:8080"), ("Content-Length", "12"),
        ("Cookie", "session=1"), ("Proxy-Authorization", "Basic x"), ("TE", "trailers"), ("Upgrade", "h2c"),
        ("Content-Type", "application/json"), ("Accept", "text/event-stream"), ("X-Trace", "t1"),
        ("X-Trace", "t2"), ("X-Request-Id", "client-chosen"), ("User-Agent", "OpenAI/Python 1.54.0"),
        ("expect", "100-continue"),
    ]]
    request = Request("POST", b"/v1/chat/completions", headers, http10=False, keep_alive=True)
    request.id = "req-123"
    out = CIMultiDict((n.decode(), v.decode()) for n, v in upstream_headers(request))
    lowered = {k.lower() for k in out}
    for dropped in ("authorization", "connection", "keep-alive", "transfer-encoding", "host", "content-length",
                    "cookie", "proxy-authorization", "te", "upgrade", "expect"):
        assert dropped not in lowered, dropped
    assert out["Content-Type"] == "application/json" and out["Accept"] == "text/event-stream"
    assert out.getall("X-Trace") == ["t1", "t2"]
    assert out.getall("x-request-id") == ["req-123"]
    assert out["User-Agent"] == "OpenAI/Python 1.54.0"


def test_response_headers_drop_hop_by_hop_and_the_engines_request_id() -> None:
    raw = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"Transfer-Encoding", b"chunked"),
           (b"Date", b"x"), (b"server", b"uvicorn"), (b"x-request-id", b"engine-side"), (b"X-Engine", b"vllm"),
           (b"Connection", b"keep-alive"), (b"content-length", b"10")]
    out, sse = response_headers(raw, {"x-ratelimit-remaining-requests": "9"})
    assert sse
    assert out == [(b"content-type", b"text/event-stream; charset=utf-8"), (b"X-Engine", b"vllm"),
                   (b"x-ratelimit-remaining-requests", b"9")]
    assert response_headers([(b"Content-Type", b"application/json")], None) == \
        ([(b"Content-Type", b"application/json")], False)


# -- parse_in_flight -------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 123456.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_count{model_name="meta-llama/Llama-3.1-8B-Instruct"} 99.0
"""

SGLANG_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 5.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 4.0
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 812.5
"""


def test_parse_in_flight_vllm_and_sglang() -> None:
    assert parse_in_flight(VLLM_METRICS) == 3 + 1 + 2 + 0  # swapped and counters are not in flight
    assert parse_in_flight(SGLANG_METRICS) == 5 + 4


def test_parse_in_flight_unknown_or_absent() -> None:
    assert parse_in_flight("") is None
    assert parse_in_flight("# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n") is None
    assert parse_in_flight('vllm:num_requests_running_other{a="b"} 9.0\nprocess_cpu_seconds_total 3.5\n') is None
    assert parse_in_flight("vllm:num_requests_running 0.0\n") == 0
    # A garbled value is skipped, the rest still counts.
    assert parse_in_flight("vllm:num_requests_running{} NaNx\nvllm:num_requests_waiting 2\n") == 2


@given(running=st.integers(0, 500), waiting=st.integers(0, 500))
def test_parse_in_flight_sums_gauges(running: int, waiting: int) -> None:
    text = (f'vllm:num_requests_running{{model_name="a b"}} {float(running)}\n'
            f'vllm:num_requests_waiting{{model_name="a b"}} {float(waiting)}\n')
    assert parse_in_flight(text) == running + waiting
