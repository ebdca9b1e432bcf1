"""Usage compaction: fold the records of gone gateways, old days and legacy records (a pure plan and
a thin etcd shell). Run by the gateway fleet's elected compactor and by `ctl usage compact`.

    list accounting/ + usage/ + gateways/ ─▶ plan_sources (what to fold where, pure)
        └─ for each source: fold_step (pure) ─▶ ONE txn:
             compare  mod(source) and mod(every touched target part) (+ the leader's fence)
             success  delete source (or put the rest of it) ; put the touched target parts
           lost a compare ─▶ stop this run; the next run lists again

Every move is one transaction that deletes (or shrinks) its source and grows its target by the
same counts, guarded by the revisions it read: a fold is never half done and never done twice,
whoever runs it and however many compactors race. Rules (``plan_sources``):

* a writer's record (``writers/<w>/<day>/<p>``) goes to ``merged/<day>`` when the writer is gone
  (no live GatewayRecord names it) and either wrote ``final`` on a clean stop or has been silent
  for ``grace_s``; and, live or not, once its day is two days old (gateways only write today).
  Its key is not deleted but left as a *tombstone*: no counts, ``folded`` set, the folded write's
  ``seq`` kept. A writer that was only cut off (and wrongly looked gone) then learns exactly which
  of its writes was folded, even one whose answer it never got, and counts nothing twice.
  Tombstones are deleted after ``tombstone_s`` (a day): a writer cut off longer than that may
  count its last unanswered write twice (docs/etcd-layout.md);
* a merged day older than ``keep_days`` goes to ``merged/<month>`` (so are sources that old);
* a legacy ``usage/<key>/<model>/<gateway>`` record goes to the merged day it was last updated
  once its gateway has no GatewayRecord and every live gateway is new (an old gateway rewrites
  its cumulative record and would count it twice), and it has been silent for ``grace_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from controlplane.accounting.blocks import (
    PART_BYTES,
    TXN_BYTES,
    Block,
    BlockError,
    days_before,
    decode,
    encode,
    from_legacy,
    is_day,
    month_of,
    place,
    split_by_part,
)
from controlplane.keys import Keys, RecordDecodeError
from controlplane.keys import decode as decode_record
from controlplane.leader import Fence
from controlplane.pb import GatewayRecord, Usage, UsageBlock
from controlplane.store import Cmp, EtcdStore, KeyValue, Op

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CompactSettings:
    """When records are folded (docs/etcd-layout.md has the arithmetic)."""

    keep_days: int = 40             # merged days older than this become months
    grace_s: float = 600.0          # a gone writer's (or legacy) record silent this long is folded
    tombstone_s: float = 86400.0    # a folded writer record stays (empty) this long
    max_txns: int = 200             # per run: the rest waits for the next run


@dataclass(slots=True)
class StoredBlock:
    """A decoded UsageBlock with the key and mod revision it was read at."""

    key: str
    period: str
    part: int
    writer: str
    block: Block
    mod_revision: int
    updated_unix_ms: int = 0
    final: bool = False
    seq: int = 0
    folded: bool = False


@dataclass(slots=True)
class UsageView:
    """Everything compaction decides on, as read at one moment."""

    writers: list[StoredBlock] = field(default_factory=list)
    merged: dict[str, dict[int, StoredBlock]] = field(default_factory=dict)   # period -> part -> block
    legacy: list[tuple[KeyValue, Usage]] = field(default_factory=list)
    live_writers: set[str] = field(default_factory=set)
    live_gateways: set[str] = field(default_factory=set)
    old_gateways: int = 0          # live GatewayRecords without usage_writer (gateways before UsageBlock)
    undecodable: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Source:
    """One record to fold into ``target`` (a period of merged/); ``period`` and ``writer`` are its own."""

    key: str
    block: Block
    mod_revision: int
    target: str
    why: str
    period: str = ""
    writer: str = ""
    seq: int = 0          # a writer record's write sequence number (kept in its tombstone)


@dataclass(frozen=True, slots=True)
class FoldStep:
    """One transaction's contents: the source's rest (None: delete it) and the target parts to put
    (the shell guards the source and every put part on the mod revisions it read)."""

    source_rest: Block | None
    puts: tuple[tuple[int, Block], ...]            # (merged part index, its new contents)


def target_period(period: str, now_s: float, keep_days: int) -> str:
    """Where a period's counts go when folded: the day itself, or its month past the keep horizon."""
    if is_day(period) and period < days_before(now_s, keep_days):
        return month_of(period)
    return period


def plan_sources(view: UsageView, now_s: float, settings: CompactSettings) -> list[Source]:
    """What to fold now, oldest first (pure; see the module docstring for the rules)."""
    out: list[Source] = []
    two_days_ago = days_before(now_s, 2)
    silent_before_ms = (now_s - settings.grace_s) * 1000
    for sb in view.writers:
        if sb.folded and not len(sb.block):
            continue     # a tombstone: see expired_tombstones
        gone = sb.writer not in view.live_writers
        why = ""
        if gone and (sb.final or sb.updated_unix_ms < silent_before_ms):
            why = "writer stopped" if sb.final else "writer gone"
        elif is_day(sb.period) and sb.period <= two_days_ago:
            why = "day over"
        if why:
            out.append(Source(sb.key, sb.block, sb.mod_revision, target_period(sb.period, now_s, settings.keep_days),
                              why, sb.period, sb.writer, sb.seq))
    if view.old_gateways == 0:
        for kv, rec in view.legacy:
            if rec.gateway_id in view.live_gateways or rec.updated_unix_ms >= silent_before_ms:
                continue
            day, block = from_legacy(rec)
            out.append(Source(kv.key, block, kv.mod_revision, target_period(day, now_s, settings.keep_days),
                              "legacy record", day))
    for period in sorted(view.merged):
        target = target_period(period, now_s, settings.keep_days)
        if target != period:
            for part in sorted(view.merged[period]):
                sb = view.merged[period][part]
                out.append(Source(sb.key, sb.block, sb.mod_revision, target, "day folded into month", period))
    return sorted(out, key=lambda s: (s.target, s.key))


def expired_tombstones(view: UsageView, now_s: float, settings: CompactSettings) -> list[StoredBlock]:
    """Tombstones older than ``tombstone_s`` (pure): deleted by the next run."""
    before_ms = (now_s - settings.tombstone_s) * 1000
    return [sb for sb in view.writers if sb.folded and not len(sb.block) and sb.updated_unix_ms < before_ms]


def fold_step(source: Source, targets: Mapping[int, StoredBlock], txn_bytes: int = TXN_BYTES,
              part_bytes: int = PART_BYTES) -> FoldStep:
    """The next transaction moving (part of) ``source`` into the target parts (pure).

    Whole target parts are taken in order while the bytes written stay within ``txn_bytes`` (at
    least one part per step, so every step makes progress); what is left of the source is put
    back and moved by the next step.
    """
    current = {i: sb.block for i, sb in targets.items()}
    where = place(current, sorted(source.block.cells), part_bytes)
    rest = source.block.copy()
    puts: list[tuple[int, Block]] = []
    budget = txn_bytes
    for idx, chunk in split_by_part(source.block, where):
        grown = current[idx].copy() if idx in current else Block()
        grown.add(chunk)
        cost = grown.estimated_bytes()
        if puts and cost > budget:
            break
        puts.append((idx, grown))
        budget -= cost
        rest.subtract(chunk)
    return FoldStep(rest if len(rest) else None, tuple(puts))


# -- the etcd shell --------------------------------------------------------------------------------


@dataclass
class CompactReport:
    """What one compaction run did."""

    folded: list[tuple[str, str, str]] = field(default_factory=list)   # (source key, target period, why)
    tombstones_removed: int = 0
    transactions: int = 0
    conflicts: int = 0
    undecodable: list[str] = field(default_factory=list)
    pending: int = 0          # sources left for the next run (max_txns reached or a conflict)


async def read_view(store: EtcdStore, keys: Keys) -> UsageView:
    """List accounting/, the legacy usage/ and gateways/ at one revision and decode them."""
    kvs, rev = await store.list_prefix(keys.accounting)
    legacy_kvs, _ = await store.list_prefix(keys.usage, revision=rev)
    gateway_kvs, _ = await store.list_prefix(keys.gateways, revision=rev)
    view = UsageView()
    for kv in gateway_kvs:
        try:
            g = decode_record(GatewayRecord, kv)
        except RecordDecodeError as exc:
            view.undecodable.append(str(exc))
            view.old_gateways += 1      # unknown version: be careful with legacy records
            continue
        view.live_gateways.add(g.gateway_id)
        if g.usage_writer:
            view.live_writers.add(g.usage_writer)
        else:
            view.old_gateways += 1
    for kv in kvs:
        where = keys.parse_usage_block_key(kv.key)
        if where is None:
            continue        # the leader key, or something foreign: not ours to fold
        try:
            msg = decode_record(UsageBlock, kv)
            block = decode(msg)
        except (RecordDecodeError, BlockError) as exc:
            view.undecodable.append(f"{kv.key}: {exc}")
            continue
        sb = StoredBlock(kv.key, where.period, where.part, where.writer, block, kv.mod_revision,
                         msg.updated_unix_ms, msg.final, msg.seq, msg.folded)
        if where.writer:
            view.writers.append(sb)
        else:
            view.merged.setdefault(where.period, {})[where.part] = sb
    for kv in legacy_kvs:
        try:
            view.legacy.append((kv, decode_record(Usage, kv)))
        except RecordDecodeError as exc:
            view.undecodable.append(str(exc))
    return view


async def compact_usage(store: EtcdStore, keys: Keys, now_s: float, settings: CompactSettings = CompactSettings(),
                        *, fence: Fence | None = None, dry_run: bool = False) -> CompactReport:
    """One compaction run (see the module docstring). Undecodable records are reported, never folded
    or deleted: an operator must look at them."""
    view = await read_view(store, keys)
    report = CompactReport(undecodable=list(view.undecodable))
    sources = plan_sources(view, now_s, settings)
    expired = expired_tombstones(view, now_s, settings)
    if dry_run:
        report.folded = [(s.key, s.target, s.why) for s in sources]
        report.tombstones_removed = len(expired)
        return report
    for sb in expired[:settings.max_txns]:
        ok, _ = await store.txn([Cmp.mod_revision(sb.key, sb.mod_revision), *(fence.cmps() if fence else [])],
                                [Op.delete(sb.key)])
        report.transactions += 1
        report.tombstones_removed += ok
    for n, source in enumerate(sources):
        if report.transactions >= settings.max_txns:
            report.pending = len(sources) - n
            break
        moved = await _fold(store, keys, source, view.merged.setdefault(source.target, {}), fence, report,
                            int(now_s * 1000))
        if not moved:
            report.conflicts += 1
            report.pending = len(sources) - n
            break   # the state moved under us: the next run lists again
        report.folded.append((source.key, source.target, source.why))
    if report.folded or report.tombstones_removed:
        log.info("usage compacted", folded=len(report.folded), transactions=report.transactions,
                 tombstones_removed=report.tombstones_removed, pending=report.pending)
    return report


async def _fold(store: EtcdStore, keys: Keys, source: Source, targets: dict[int, StoredBlock],
                fence: Fence | None, report: CompactReport, now_ms: int) -> bool:
    """Move ``source`` into ``targets`` (updated in place as the transactions commit)."""
    while True:
        step = fold_step(source, targets)
        compares = [Cmp.mod_revision(source.key, source.mod_revision)]
        ops: list[Op] = []
        for idx, block in step.puts:
            key = keys.usage_merged_part(source.target, idx)
            compares.append(Cmp.mod_revision(key, targets[idx].mod_revision if idx in targets else 0))
            ops.append(Op.put(key, encode(block, period=source.target).SerializeToString()))
        if source.writer:      # what is left of the writer's write `seq` (nothing: a tombstone)
            ops.append(Op.put(source.key, encode(step.source_rest or Block(), period=source.period,
                                                 writer=source.writer, seq=source.seq, folded=True,
                                                 updated_unix_ms=now_ms).SerializeToString()))
        elif step.source_rest is None:
            ops.append(Op.delete(source.key))
        else:
            ops.append(Op.put(source.key, encode(step.source_rest, period=source.period).SerializeToString()))
        if fence is not None:
            compares += fence.cmps()
        ok, rev = await store.txn(compares, ops)
        report.transactions += 1
        if not ok:
            return False
        for idx, block in step.puts:
            targets[idx] = StoredBlock(keys.usage_merged_part(source.target, idx), source.target, idx, "", block, rev)
        if step.source_rest is None:
            return True
        # a source folded in several steps shrinks in place (a legacy record is one cell: moved whole)
        source = Source(source.key, step.source_rest, rev, source.target, source.why, source.period, source.writer,
                        source.seq)
