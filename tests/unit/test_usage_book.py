"""Usage accounting, pure parts: the gateway's UsageBook (parts, CAS reconciliation), compaction plans
and fold steps, `ctl usage` parsing and grouping. Exactness under folds, lost answers and restarts
is checked against a model of etcd's compare-and-swap (a dict of value and mod revision)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.accounting.blocks import Block, Counts, day_of, decode, encode, from_legacy, period_bounds, place
from controlplane.accounting.compact import (
    CompactSettings,
    Source,
    StoredBlock,
    UsageView,
    fold_step,
    plan_sources,
    target_period,
)
from controlplane.accounting.report import Entry, UsageRead, group, parse_since, select
from controlplane.pb import Usage, UsageBlock
from controlplane.store import KeyValue
from gateway.sse import TokenUsage
from gateway.usage import PartWrite, UsageBook

DAY0 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
T = TokenUsage


def total(block: Block) -> tuple[int, int, int, int]:
    return block.total().as_tuple()


# -- blocks ----------------------------------------------------------------------------------------


def test_blocks_encode_compactly_and_round_trip() -> None:
    b = Block()
    b.count(("k1", "org/model-a"), Counts(2, 10, 20, 1), "ann")
    b.count(("k2", "org/model-a"), Counts(1, 5, 5, 0))
    msg = encode(b, period="2026-12-01", writer="gw@1", seq=3)
    assert list(msg.key_ids) == ["k1", "k2"] and list(msg.models) == ["org/model-a"] and list(msg.owners) == ["ann", ""]
    back = decode(UsageBlock.FromString(msg.SerializeToString()))
    assert back.cells == b.cells and back.owners == {"k1": "ann"}
    bad = UsageBlock(key_ids=["k"], models=["m"])
    bad.cells.add(key=1, model=0, requests=1)
    with pytest.raises(ValueError, match="outside the tables"):
        decode(bad)


def test_periods_and_legacy_records() -> None:
    assert day_of(DAY0) == "2026-12-01"
    assert period_bounds("2026-02") == (dt.date(2026, 2, 1), dt.date(2026, 2, 28))
    assert period_bounds("2026-12") == (dt.date(2026, 12, 1), dt.date(2026, 12, 31))
    with pytest.raises(ValueError):
        period_bounds("2026")
    day, block = from_legacy(Usage(key_id="k", model="m", requests=4, errors=1, updated_unix_ms=int(DAY0 * 1000)))
    assert day == "2026-12-01" and block.cells[("k", "m")] == Counts(4, 0, 0, 1)
    assert target_period("2026-10-25", DAY0, keep_days=40) == "2026-10-25"
    assert target_period("2026-10-25", DAY0, keep_days=30) == "2026-10"


def test_place_keeps_pairs_in_their_part_and_opens_parts_when_full() -> None:
    one = Block()
    one.count(("k0", "m"), Counts(1))
    where = place({0: one}, [("k0", "m"), ("k1", "m"), ("k2", "m")], part_bytes=60)
    assert where == {("k0", "m"): 0, ("k1", "m"): 0, ("k2", "m"): 1}    # 27 bytes a pair


# -- the gateway's UsageBook -----------------------------------------------------------------------


def test_book_writes_only_dirty_parts_one_record_per_part_and_day() -> None:
    book = UsageBook("gw", "gw@a")
    for i in range(50):
        book.record(f"k{i}", "ann", "m", T(3, 4), error=False, now_s=DAY0)
    book.record("k0", "ann", "m", None, error=True, now_s=DAY0)
    (w,) = book.pending(2)
    assert (w.day, w.part, w.expected_mod) == ("2026-12-01", 0, 0) and len(w.block) == 50
    assert w.block.cells[("k0", "m")] == Counts(2, 3, 4, 1)
    book.written([w], revision=7, now=1.0)
    assert book.pending(2) == []
    book.record("k3", "ann", "m", T(1, 1), error=False, now_s=DAY0 + 1)
    (again,) = book.pending(2)
    assert again.expected_mod == 7 and again.block.cells[("k3", "m")] == Counts(2, 4, 5, 0)
    rec = again.record("gw@a", "gw", 123)
    assert (rec.period, rec.writer, rec.gateway_id, rec.seq) == ("2026-12-01", "gw@a", "gw", again.seq)


def test_book_splits_a_day_into_parts_and_writes_the_least_recently_written_first() -> None:
    book = UsageBook("gw", "gw@a", part_bytes=200)
    for i in range(20):
        book.record(f"key-{i:03d}", "", "model", None, error=False, now_s=DAY0)
    parts = book.days["2026-12-01"].parts
    assert len(parts) >= 3 and sum(len(p.current) for p in parts.values()) == 20
    first = book.pending(2)
    assert [w.part for w in first] == [0, 1]
    book.written(first, 5, now=1.0)
    for i in range(20):                                 # every part dirty again
        book.record(f"key-{i:03d}", "", "model", None, error=False, now_s=DAY0)
    assert book.pending(2)[0].part == 2                 # never written: before the ones written at t=1


def test_final_writes_every_part_marked_final() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    book.written(book.pending(), 3, now=0.0)
    (w,) = book.pending(final=True)
    assert w.final and w.record("gw@a", "gw", 0).final


def test_a_folded_part_keeps_only_the_increments_since_the_write() -> None:
    book = UsageBook("gw", "gw@a")
    for _ in range(3):
        book.record("k", "", "m", T(1, 1), error=False, now_s=DAY0)
    (w,) = book.pending()
    book.written([w], 9, now=0.0)                       # etcd holds 3 requests ...
    book.record("k", "", "m", T(1, 1), error=False, now_s=DAY0)
    book.record("k", "", "m", T(1, 1), error=False, now_s=DAY0)
    (w2,) = book.pending()
    tombstone = encode(Block(), period=w.day, writer="gw@a", seq=w.seq, folded=True)
    assert book.resolve(w2, tombstone, 12)              # ... which the compactor folded: a tombstone
    (w3,) = book.pending()
    assert w3.expected_mod == 12 and total(w3.block) == (2, 2, 2, 0)
    assert book.resolve(w3, None, 0)                    # the tombstone expired meanwhile: nothing there
    (w4,) = book.pending()
    assert w4.expected_mod == 0 and total(w4.block) == (2, 2, 2, 0)


def test_a_fold_of_a_write_whose_answer_was_lost_is_subtracted_exactly() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w,) = book.pending()
    book.unanswered([w])                                # it committed; then the compactor folded it
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w2,) = book.pending()
    assert book.resolve(w2, encode(Block(), period=w.day, writer="gw@a", seq=w.seq, folded=True), 15)
    (w3,) = book.pending()
    assert (w3.expected_mod, total(w3.block)[0]) == (15, 1)


def test_a_write_whose_answer_was_lost_is_recognised_when_it_did_commit() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w,) = book.pending()
    book.unanswered([w])                                # etcd did commit it, at revision 11
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w2,) = book.pending()
    assert w2.expected_mod == 0                         # the compare fails: the key exists
    assert book.resolve(w2, w.record("gw@a", "gw", 0), 11)
    (w3,) = book.pending()
    assert w3.expected_mod == 11 and total(w3.block)[0] == 2    # nothing counted twice


def test_a_day_recreated_after_it_was_dropped_adds_to_what_etcd_holds() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w,) = book.pending()
    stored = w.record("gw@a", "gw", 0)
    book.written([w], 4, now=0.0)
    assert book.drop_finished("2026-12-02") == ["2026-12-01"]
    book.record("k", "", "m", None, error=False, now_s=DAY0)    # the clock stepped back a day
    (w2,) = book.pending()
    assert book.resolve(w2, stored, 4)
    (w3,) = book.pending()
    assert (w3.expected_mod, total(w3.block)[0]) == (4, 2)


def test_another_writers_record_under_our_key_is_kept_and_reported() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    (w,) = book.pending()
    foreign = Block()
    foreign.count(("k", "m"), Counts(5))
    assert not book.resolve(w, encode(foreign, period="2026-12-01", writer="other"), 2)
    (w2,) = book.pending()
    assert total(w2.block)[0] == 6


def test_finished_days_are_dropped_only_once_written() -> None:
    book = UsageBook("gw", "gw@a")
    book.record("k", "", "m", None, error=False, now_s=DAY0)
    assert book.drop_finished("2026-12-02") == []
    book.written(book.pending(), 2, now=0.0)
    assert book.drop_finished("2026-12-01") == []       # today: kept
    assert book.drop_finished("2026-12-02") == ["2026-12-01"] and book.dirty_parts == 0


class CasModel:
    """etcd's compare-and-swap on mod revisions, and a compactor that folds whole keys."""

    def __init__(self) -> None:
        self.kv: dict[tuple[str, int], tuple[UsageBlock, int]] = {}
        self.rev = 1
        self.merged = Counts()

    def txn(self, writes: list[PartWrite], writer: str, commit: bool = True) -> bool:
        if any(self.kv.get((w.day, w.part), (None, 0))[1] != w.expected_mod for w in writes):
            return False
        if commit:
            self.rev += 1
            for w in writes:
                self.kv[(w.day, w.part)] = (w.record(writer, "gw", 0), self.rev)
        return True

    def fold_all(self) -> None:
        """What compact.py does with a writer's records: counts to merged/, a tombstone left."""
        for k, (msg, _) in list(self.kv.items()):
            self.merged.add(decode(msg).total())
            self.rev += 1
            self.kv[k] = (encode(Block(), period=msg.period, writer=msg.writer, seq=msg.seq, folded=True), self.rev)

    def clean(self) -> None:
        """Tombstones expire (the writer reached etcd since: it has no unanswered write)."""
        for k, (msg, _) in list(self.kv.items()):
            if msg.folded and not msg.cells:
                del self.kv[k]

    def stored(self) -> Counts:
        out = self.merged.copy()
        for msg, _ in self.kv.values():
            out.add(decode(msg).total())
        return out


ops = st.lists(st.sampled_from(["record", "record", "record", "flush", "flush", "lost-commit", "lost-nothing",
                                "fold", "clean", "next-day"]), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=ops, max_parts=st.integers(1, 3))
def test_every_count_reaches_etcd_exactly_once_whatever_happens(ops: list[str], max_parts: int) -> None:
    book = UsageBook("gw", "gw@a", part_bytes=80)
    etcd = CasModel()
    counted = Counts()
    now = DAY0

    def flush(commit_lost: bool | None = None) -> None:
        writes = book.pending(max_parts)
        if not writes:
            return
        if commit_lost is not None:                     # the answer is lost; it committed or not
            etcd.txn(writes, book.writer, commit=commit_lost)
            book.unanswered(writes)
            return
        if etcd.txn(writes, book.writer):
            book.written(writes, etcd.rev, now)
            return
        for w in writes:
            found = etcd.kv.get((w.day, w.part))
            book.resolve(w, found[0] if found else None, found[1] if found else 0)

    for n, op in enumerate(ops, start=1):
        if op == "record":
            book.record(f"k{n % 7}", "", f"m{n % 3}", T(n % 5, n % 11), error=n % 4 == 0, now_s=now)
            counted.add(Counts(1, n % 5, n % 11, int(n % 4 == 0)))
        elif op == "flush":
            flush()
        elif op.startswith("lost"):
            flush(commit_lost=op == "lost-commit")
        elif op == "fold":
            etcd.fold_all()
        elif op == "clean":
            if not any(p.attempts for d in book.days.values() for p in d.parts.values()):
                etcd.clean()
        else:
            now += 86400
            book.drop_finished(day_of(now))
    for _ in range(40):                                  # etcd answers again: flush until clean
        flush()
        if not book.dirty_parts:
            break
    assert book.dirty_parts == 0
    assert etcd.stored() == counted


# -- compaction plans ------------------------------------------------------------------------------


def _sb(key: str, period: str, writer: str, requests: int, *, updated_s: float, final: bool = False) -> StoredBlock:
    b = Block()
    b.count(("k", "m"), Counts(requests))
    return StoredBlock(key, period, 0, writer, b, 5, int(updated_s * 1000), final)


def test_plan_folds_gone_writers_finished_days_old_days_and_legacy_records() -> None:
    now = DAY0
    s = CompactSettings(keep_days=10, grace_s=600)
    view = UsageView(
        writers=[_sb("w/live/today", "2026-12-01", "live", 1, updated_s=now),
                 _sb("w/live/yesterday", "2026-11-30", "live", 1, updated_s=now),
                 _sb("w/live/old", "2026-11-29", "live", 1, updated_s=now),
                 _sb("w/stopped/today", "2026-12-01", "stopped", 1, updated_s=now, final=True),
                 _sb("w/crashed-now/today", "2026-12-01", "crashed-now", 1, updated_s=now - 60),
                 _sb("w/crashed/today", "2026-12-01", "crashed", 1, updated_s=now - 700)],
        merged={"2026-11-01": {0: _sb("m/2026-11-01/0", "2026-11-01", "", 1, updated_s=0)},
                "2026-11-25": {0: _sb("m/2026-11-25/0", "2026-11-25", "", 1, updated_s=0)}},
        legacy=[(KeyValue(f"u/k/m/{gw}", b"", 1, 3, 1, 0),
                 Usage(key_id="k", model="m", gateway_id=gw, requests=2, updated_unix_ms=int((now - 3600) * 1000)))
                for gw in ("old-gw", "live-gw")],
        live_writers={"live"}, live_gateways={"live-gw"})
    got = {src.key: (src.target, src.why) for src in plan_sources(view, now, s)}
    assert got == {"w/live/old": ("2026-11-29", "day over"),
                   "w/stopped/today": ("2026-12-01", "writer stopped"),
                   "w/crashed/today": ("2026-12-01", "writer gone"),
                   "m/2026-11-01/0": ("2026-11", "day folded into month"),
                   "u/k/m/old-gw": ("2026-12-01", "legacy record")}
    view.old_gateways = 1                                # an old gateway still rewrites its legacy records
    assert "u/k/m/old-gw" not in {src.key for src in plan_sources(view, now, s)}


def test_fold_steps_stay_under_the_transaction_budget_and_move_everything() -> None:
    src = Block()
    for i in range(60):
        src.count((f"key-{i:03d}", "model"), Counts(i + 1))
    existing = Block()
    existing.count(("key-000", "model"), Counts(100))
    targets = {0: StoredBlock("m/0", "2026-12-01", 0, "", existing, 3)}
    source = Source("w/x", src, 9, "2026-12-01", "writer gone", "2026-12-01", "x")
    moved, steps = Counts(), 0
    while True:
        step = fold_step(source, targets, txn_bytes=700, part_bytes=300)
        steps += 1
        for idx, block in step.puts:
            assert block.estimated_bytes() <= 700 or len(step.puts) == 1
            targets[idx] = StoredBlock(f"m/{idx}", "2026-12-01", idx, "", block, 10 + steps)
        if step.source_rest is None:
            break
        source = Source(source.key, step.source_rest, 20 + steps, source.target, source.why)
    assert steps > 1
    for sb in targets.values():
        moved.add(sb.block.total())
    assert moved.requests == sum(range(1, 61)) + 100


# -- ctl usage: --since and grouping ---------------------------------------------------------------


def test_since_accepts_relative_and_dates_and_names_the_forms_otherwise() -> None:
    now = dt.datetime(2026, 12, 10, 6, tzinfo=dt.UTC)
    assert parse_since("7d", now) == dt.date(2026, 12, 3)
    assert parse_since("36h", now) == dt.date(2026, 12, 8)
    assert parse_since("2w", now) == dt.date(2026, 11, 26)
    assert parse_since("2026-11-01", now) == dt.date(2026, 11, 1)
    for bad in ("7", "7x", "yesterday", "2026-13-01", "-3d", ""):
        with pytest.raises(ValueError, match="accepted forms"):
            parse_since(bad, now)


def test_group_by_day_model_owner_and_months_cut_by_since() -> None:
    read = UsageRead(entries=[Entry("2026-12-01", "k1", "m1", Counts(2, 10, 20, 0), "ann"),
                              Entry("2026-12-02", "k1", "m2", Counts(1, 1, 1, 1), "ann"),
                              Entry("2026-12-02", "k2", "m1", Counts(3, 3, 3, 0), ""),
                              Entry("2026-10", "k2", "m1", Counts(5, 0, 0, 0), "")],
                     owners={"k2": "bob"})
    by_day = group(select(read, since=dt.date(2026, 10, 15)), read.owners, "day")
    assert [(r["day"], r["requests"]) for r in by_day] == [("2026-10", 5), ("2026-12-01", 2), ("2026-12-02", 4)]
    assert read.partial == ["2026-10"]
    assert [(r["owner"], r["requests"]) for r in group(read.entries, read.owners, "owner")] == [("ann", 3), ("bob", 8)]
    assert [(r["model"], r["total_tokens"]) for r in group(read.entries, read.owners, "model")] == [("m1", 36),
                                                                                                   ("m2", 2)]
    assert len(select(read, since=dt.date(2026, 12, 2))) == 2
    with pytest.raises(ValueError, match="unknown grouping"):
        group(read.entries, read.owners, "week")
