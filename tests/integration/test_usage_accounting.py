"""Usage accounting against a real etcd, real gateway processes and real sim engines.

* exact: what `ctl usage` reports (by key, day, model, owner; json and csv) equals what the clients
  counted from the usage fields they received, through several gateways, restarts with and
  without a pinned --id, the fleet's compactor and `ctl usage compact`;
* legacy ``usage/<key>/<model>/<gateway>`` records are counted and folded;
* undecodable records are reported (exit 255), bad --by / --since are usage errors (exit 2);
* with 50 active (key, model) pairs one gateway writes at most 60 etcd puts a minute;
* a simulated month (restarts every day, compaction, days folded into months) keeps the number
  of usage keys bounded and the totals exact.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from controlplane.accounting.blocks import Counts, day_of, month_of
from controlplane.accounting.compact import CompactSettings, compact_usage
from controlplane.accounting.report import group, read_usage
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import ApiKey, GatewayRecord, Usage
from controlplane.procs import stop
from controlplane.store import EtcdConfig, EtcdStore
from gateway.app import GatewayConfig
from gateway.auth import key_hash, new_api_key
from gateway.fleet import FleetMember, FleetSettings
from gateway.limits import RateLimiter
from gateway.sse import TokenUsage
from gateway.usage import DemandMeter, UsageBook
from tests.cluster import CTL, Sim, eventually, gateway_in_process, instance_record, start_gateway

MODELS = ("acc-a", "acc-b")


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    tmp = tmp_path_factory.mktemp("acc")
    started = {m: Sim(m, tmp, "--ttft-ms", "1", "--tokens-per-s", "0") for m in MODELS}
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture
async def pool(etcd_server: EtcdProcess, sims: dict[str, Sim]) -> AsyncIterator[tuple[EtcdStore, Keys]]:
    prefix = f"/mp-acc-{uuid.uuid4().hex[:8]}"
    store = await EtcdStore(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    for name, sim in sims.items():
        rec = instance_record(name, f"{name}-1", sim.url)
        await store.put(keys.instance(name, f"{name}-1"), rec.SerializeToString())
    yield store, keys
    await store.close()


async def add_key(store: EtcdStore, keys: Keys, owner: str, **fields: object) -> tuple[str, str]:
    secret = new_api_key()
    kid = key_hash(secret)[:8]
    await store.put(keys.api_key(key_hash(secret)), ApiKey(key_id=kid, owner=owner, **fields).SerializeToString())  # type: ignore[arg-type]
    return secret, kid


def ctl(endpoint: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "usage", "--etcd", endpoint, "--etcd-prefix", prefix, *args],
                          capture_output=True, text=True, timeout=60)


class Client:
    """Sends chat requests and counts what the answers' usage fields say, per (key id, model)."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.counted: dict[tuple[str, str], Counts] = {}

    async def call(self, url: str, secret: str, kid: str, model: str, *, stream: bool) -> None:
        body: dict[str, object] = {"model": model, "max_tokens": 3 + len(model) % 4,
                                   "messages": [{"role": "user", "content": "count me " * (1 + len(kid) % 3)}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        async with self.http.post(f"{url}/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {secret}"}) as r:
            raw = await r.read()
        assert r.status == 200, raw[:300]
        if stream:
            events = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
            usage = next(e["usage"] for e in events if e.get("usage"))
        else:
            usage = orjson.loads(raw)["usage"]
        c = self.counted.setdefault((kid, model), Counts())
        c.add(Counts(1, usage["prompt_tokens"], usage["completion_tokens"], 0))


def _sum(rows: list[dict[str, object]], field: str) -> int:
    return sum(int(r[field]) for r in rows)  # type: ignore[call-overload]


async def test_ctl_usage_is_exact_against_what_clients_received_through_restarts(pool, etcd_server, tmp_path) -> None:
    store, keys = pool
    alice, alice_id = await add_key(store, keys, "alice")
    bob, bob_id = await add_key(store, keys, "bob")
    args = ("--usage-flush", "0.5", "--usage-compact-interval", "1", "--publish-interval", "0.5")
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}

    def launch(name: str) -> None:
        extra = ("--id", "gw-pinned") if name == "pinned" else ()
        procs[name] = start_gateway(etcd_server.endpoint, store.prefix, tmp_path, *args, *extra)

    for name in ("pinned", "random"):
        launch(name)
    rng = random.Random(7)
    async with aiohttp.ClientSession() as http:
        client = Client(http)
        for url in (procs["pinned"][1], procs["random"][1]):
            await eventually(lambda u=url: _serves(http, u, alice), timeout=20, what="gateway loaded")  # type: ignore[misc]

        async def traffic(n: int) -> None:
            for i in range(n):
                name = rng.choice(list(procs))
                secret, kid = rng.choice([(alice, alice_id), (bob, bob_id)])
                await client.call(procs[name][1], secret, kid, rng.choice(MODELS), stream=i % 3 == 0)

        await traffic(40)
        for name in ("pinned", "random"):          # graceful restarts: same --id, and a new random id
            proc, _ = procs.pop(name)
            stop(proc, timeout=20)
            assert proc.returncode == 0
            launch(name)
            await eventually(lambda u=procs[name][1]: _serves(http, u, alice), timeout=20, what="restarted")  # type: ignore[misc]
            await traffic(30)
    # the fleet's compactor (the elected gateway) folds the stopped processes' final records
    await eventually(lambda: _writers(store, keys, live=2), timeout=20, what="stopped writers folded")
    for proc, _ in procs.values():
        stop(proc, timeout=20)
    expected = client.counted
    want_total = Counts()
    for c in expected.values():
        want_total.add(c)

    def check() -> None:
        out = ctl(etcd_server.endpoint, store.prefix, "-o", "json")
        assert out.returncode == 0, out.stderr
        got = {(r["key_id"], r["model"]): Counts(r["requests"], r["prompt_tokens"], r["completion_tokens"], r["errors"])
               for r in orjson.loads(out.stdout)}
        assert got == expected
        by_owner = {r["owner"]: r for r in orjson.loads(ctl(etcd_server.endpoint, store.prefix, "--by", "owner",
                                                            "-o", "json").stdout)}
        assert set(by_owner) == {"alice", "bob"}
        assert by_owner["alice"]["requests"] == sum(c.requests for (k, _), c in expected.items() if k == alice_id)
        by_model = orjson.loads(ctl(etcd_server.endpoint, store.prefix, "--by", "model", "-o", "json").stdout)
        assert {r["model"]: r["completion_tokens"] for r in by_model} == {
            m: sum(c.completion_tokens for (_, mm), c in expected.items() if mm == m) for m in MODELS}
        out = ctl(etcd_server.endpoint, store.prefix, "--since", "7d", "--by", "day", "-o", "csv")
        assert out.returncode == 0, out.stderr
        rows = list(csv.DictReader(io.StringIO(out.stdout)))
        assert [r["day"] for r in rows] == sorted({day_of(time.time() - 60), day_of(time.time())})[-len(rows):]
        assert (_sum(rows, "requests"), _sum(rows, "prompt_tokens"), _sum(rows, "completion_tokens")) == (
            want_total.requests, want_total.prompt_tokens, want_total.completion_tokens)

    check()
    out = ctl(etcd_server.endpoint, store.prefix, "compact", "--grace", "0", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert await _writers(store, keys, live=0)     # everything folded into merged/ now
    check()
    # the fold left only merged records and tombstones behind
    kvs, _ = await store.list_prefix(keys.accounting)
    assert any(kv.key.startswith(keys.usage_merged) for kv in kvs)


async def _serves(http: aiohttp.ClientSession, url: str, secret: str) -> bool:
    async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status == 200 and len((await r.json())["data"]) == len(MODELS)


async def _writers(store: EtcdStore, keys: Keys, live: int) -> bool:
    """True when only ``live`` writers still have records with counts (the rest folded)."""
    read = await read_usage(store, keys)
    assert not read.undecodable
    kvs, _ = await store.list_prefix(keys.usage_writers)
    from controlplane.keys import decode as decode_record
    from controlplane.pb import UsageBlock
    writers = {decode_record(UsageBlock, kv).writer for kv in kvs if decode_record(UsageBlock, kv).cells}
    return len(writers) <= live


async def test_legacy_usage_records_are_counted_then_folded_once_their_gateway_is_gone(pool, etcd_server) -> None:
    store, keys = pool
    _, kid = await add_key(store, keys, "carol")
    old = int((time.time() - 3600) * 1000)
    for gw, n in (("old-1", 5), ("old-2", 7)):
        await store.put(keys.usage_entry(kid, "acc-a", gw), Usage(key_id=kid, model="acc-a", gateway_id=gw, requests=n,
                                                                  prompt_tokens=2 * n, completion_tokens=3 * n,
                                                                  errors=1, updated_unix_ms=old).SerializeToString())
    # an old gateway (no usage_writer) is still running: its legacy records must stay
    await store.put(keys.gateway("old-1"), GatewayRecord(gateway_id="old-1").SerializeToString())
    before = orjson.loads(ctl(etcd_server.endpoint, store.prefix, "-o", "json").stdout)
    assert [(r["owner"], r["requests"], r["prompt_tokens"], r["errors"]) for r in before] == [("carol", 12, 24, 2)]
    report = await compact_usage(store, keys, time.time(), CompactSettings(grace_s=0))
    assert report.folded == []
    await store.delete(keys.gateway("old-1"))            # the old fleet is gone
    out = ctl(etcd_server.endpoint, store.prefix, "compact", "--grace", "0")
    assert out.returncode == 0, out.stderr
    assert (await store.list_prefix(keys.usage))[0] == []
    assert orjson.loads(ctl(etcd_server.endpoint, store.prefix, "-o", "json").stdout) == before
    day = orjson.loads(ctl(etcd_server.endpoint, store.prefix, "--by", "day", "-o", "json").stdout)
    assert day == [{"day": day_of(old / 1000), "requests": 12, "prompt_tokens": 24, "completion_tokens": 36,
                    "total_tokens": 60, "errors": 2}]


async def test_undecodable_records_are_reported_and_bad_flags_are_usage_errors(pool, etcd_server) -> None:
    store, keys = pool
    bad_key = keys.usage_writer_part("gw@x", "2026-12-01", 0)
    await store.put(bad_key, b"\xff\xff\xff")
    out = ctl(etcd_server.endpoint, store.prefix)
    assert out.returncode == 255 and bad_key in out.stderr and "NOT in the totals" in out.stderr
    out = ctl(etcd_server.endpoint, store.prefix, "--by", "week")
    assert out.returncode == 2 and "key, day, model, owner" in out.stderr
    for since in ("yesterday", "7", "2026-02-30"):
        out = ctl(etcd_server.endpoint, store.prefix, "--since", since)
        assert out.returncode == 2 and "accepted forms are <N>d, <N>h or <N>w" in out.stderr, out.stderr
    report = await compact_usage(store, keys, time.time(), CompactSettings(grace_s=0))
    assert report.undecodable and await store.get(bad_key) is not None     # never folded or deleted


async def test_one_gateway_writes_at_most_60_puts_a_minute_with_50_active_pairs(pool, etcd_server) -> None:
    store, keys = pool
    secrets = [await add_key(store, keys, f"owner-{i}") for i in range(25)]
    pairs = [(s, kid, m) for (s, kid), m in itertools.product(secrets, MODELS)]
    assert len(pairs) == 50
    cfg = GatewayConfig(etcd=store.config, fleet=FleetSettings(lease_ttl_s=10))   # the default cadence
    async with gateway_in_process(cfg) as (_, url), aiohttp.ClientSession() as http:
        client = Client(http)
        await eventually(lambda: _serves(http, url, secrets[0][0]), what="gateway loaded")
        puts: list[str] = []
        watcher = asyncio.create_task(_count_puts(store, keys, puts))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        for s, kid, model in itertools.islice(itertools.cycle(pairs), 10_000):   # every pair every ~2 s
            await client.call(url, s, kid, model, stream=False)
            await asyncio.sleep(0.04)
            if time.monotonic() - started >= 20:
                break
        elapsed = time.monotonic() - started
        watcher.cancel()
        assert len(client.counted) == 50
        per_minute = len(puts) * 60 / elapsed
        print(f"{len(puts)} puts in {elapsed:.1f}s with 50 active pairs: {per_minute:.1f}/min")
        assert per_minute <= 60, puts


async def _count_puts(store: EtcdStore, keys: Keys, puts: list[str]) -> None:
    from controlplane.store import Changes, watch_prefix
    async for update in watch_prefix(store, store.prefix + "/"):
        if isinstance(update, Changes):
            puts.extend(c.key for c in update.changes if c.kv is not None)


async def test_a_simulated_month_keeps_usage_keys_bounded_and_totals_exact(pool) -> None:
    """45 simulated days: three gateway slots restart every day (a new writer each time), record
    usage four times a day, flush; the compactor runs after every tick. Keys stay bounded; the
    totals, per day and (past keep_days) per month, stay exact."""
    store, keys = pool
    keep_days = 10
    settings = CompactSettings(keep_days=keep_days, grace_s=3600)
    clock = [time.time() - 45 * 86400]
    expected: dict[str, Counts] = {}
    members: list[FleetMember] = []
    peak = 0
    rng = random.Random(3)

    def member(slot: int) -> FleetMember:
        book = UsageBook(f"slot-{slot}")
        return FleetMember(store, keys, f"slot-{slot}", "", FleetSettings(), book, DemandMeter(0.0),
                           RateLimiter(), clock=lambda: clock[0])

    async def register(m: FleetMember) -> None:
        await store.put(keys.gateway(m.gateway_id), GatewayRecord(gateway_id=m.gateway_id,
                                                                  usage_writer=m.usage.writer).SerializeToString())

    for slot in range(3):
        members.append(member(slot))
        await register(members[-1])
    for day in range(45):
        for tick in range(4):
            clock[0] += 6 * 3600
            for m in members:
                for _ in range(rng.randint(1, 6)):
                    kid, model = f"key{rng.randint(0, 9)}", f"model{rng.randint(0, 4)}"
                    m.usage.record(kid, "o", model, TokenUsage(2, 3), error=False, now_s=clock[0])
                    expected.setdefault(day_of(clock[0]), Counts()).add(Counts(1, 2, 3, 0))
                await m.flush_usage()
            if tick == 2:                      # one slot restarts: a clean stop, a new writer
                slot = day % 3
                old = members[slot]
                await old.flush_usage(final=True)
                await store.delete(keys.gateway(old.gateway_id))
                members[slot] = member(slot)
                await register(members[slot])
            await compact_usage(store, keys, clock[0], settings)
            kvs, _ = await store.list_prefix(keys.accounting)
            peak = max(peak, len(kvs))
    # bound (docs/etcd-layout.md): 3 live writers x 2 days, tombstones of a day's folds (3 day-over,
    # 2 per restart), merged days (keep_days + 3) and months (2)
    bound = 3 * 2 + (3 + 2) * 2 + (keep_days + 3) + 2
    print(f"peak usage keys {peak} (bound {bound})")
    assert peak <= bound, (peak, bound)
    for m in members:
        await m.flush_usage(final=True)
    read = await read_usage(store, keys)
    got = {r["day"]: (r["requests"], r["prompt_tokens"], r["completion_tokens"])
           for r in group(read.entries, {}, "day")}
    want: dict[str, tuple[int, int, int]] = {}
    horizon = day_of(clock[0] - keep_days * 86400)
    for d, c in expected.items():
        period = month_of(d) if d < horizon else d
        r, p, cc = want.get(period, (0, 0, 0))
        want[period] = (r + c.requests, p + c.prompt_tokens, cc + c.completion_tokens)
    assert got == want
    assert any(len(str(p)) == 7 for p in got)           # some days were folded into months
    for m in members:
        await store.delete(keys.gateway(m.gateway_id))
