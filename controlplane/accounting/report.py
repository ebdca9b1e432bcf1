"""Reading usage for `ctl usage`: every record, summed by (key, model), day, model or owner.

    list accounting/ + usage/ (legacy) + keys/ ─▶ Entry per (period, key, model) ─▶ since ─▶ filters
        ─▶ group(by) ─▶ rows

A record that does not decode is named in ``UsageRead.undecodable`` and the caller must say so:
its counts are missing from every total (`ctl usage` exits non-zero then).

Periods are UTC days; counts older than the keep horizon are folded into months, and a month
row covers the whole month even when ``since`` falls inside it (``UsageRead.partial`` names such
months). Legacy records carry lifetime totals and count on the day they were last updated.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.accounting.blocks import BlockError, Counts, decode, from_legacy, period_bounds
from controlplane.keys import Keys, RecordDecodeError
from controlplane.keys import decode as decode_record
from controlplane.pb import ApiKey, Usage, UsageBlock
from controlplane.store import EtcdStore

GROUPINGS = ("key", "day", "model", "owner")
SINCE_FORMS = "<N>d, <N>h or <N>w (e.g. 7d, 36h, 2w), or a UTC date YYYY-MM-DD"
_RELATIVE = re.compile(r"^(\d{1,5})([hdw])$")


@dataclass(frozen=True, slots=True)
class Entry:
    """Counts of one (period, key, model) from one record."""

    period: str
    key_id: str
    model: str
    counts: Counts
    owner: str = ""


@dataclass
class UsageRead:
    """Everything `ctl usage` reads."""

    entries: list[Entry] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)     # key id -> owner, from keys/
    undecodable: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)          # months counted whole although since cuts them


def parse_since(spec: str, now: dt.datetime) -> dt.date:
    """The first UTC day ``spec`` covers; ValueError naming the accepted forms otherwise."""
    s = spec.strip().lower()
    m = _RELATIVE.match(s)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"h": dt.timedelta(hours=n), "d": dt.timedelta(days=n), "w": dt.timedelta(weeks=n)}[unit]
        return (now - delta).date()
    try:
        return dt.date.fromisoformat(s) if len(s) == 10 else _bad(spec)
    except ValueError:
        return _bad(spec)


def _bad(spec: str) -> dt.date:
    raise ValueError(f"malformed --since {spec!r}: accepted forms are {SINCE_FORMS}")


def entries_of(block_kvs: Iterable[tuple[str, UsageBlock]], legacy: Iterable[Usage],
               undecodable: list[str]) -> list[Entry]:
    """Entries of decoded UsageBlocks (with their keys) and legacy records (pure)."""
    out: list[Entry] = []
    for key, msg in block_kvs:
        try:
            block = decode(msg)
            period_bounds(msg.period)
        except (BlockError, ValueError) as exc:
            undecodable.append(f"{key}: {exc}")
            continue
        out += [Entry(msg.period, k, m, c, block.owners.get(k, "")) for (k, m), c in block.cells.items()]
    for rec in legacy:
        day, block = from_legacy(rec)
        out += [Entry(day, k, m, c) for (k, m), c in block.cells.items()]
    return out


def select(read: UsageRead, *, since: dt.date | None = None, key: str | None = None, owner: str | None = None,
           model: str | None = None) -> list[Entry]:
    """The entries that match (pure); months that ``since`` cuts are added to ``read.partial``."""
    out = []
    for e in read.entries:
        if since is not None:
            first, last = period_bounds(e.period)
            if last < since:
                continue
            if first < since and e.period not in read.partial:
                read.partial.append(e.period)
        if (key and not e.key_id.startswith(key)) or (model and e.model != model):
            continue
        if owner and owner_of(e, read.owners) != owner:
            continue
        out.append(e)
    read.partial.sort()
    return out


def owner_of(e: Entry, owners: Mapping[str, str]) -> str:
    """The key's owner: from keys/ while the key exists, else as recorded with the usage."""
    return owners.get(e.key_id) or e.owner


def group(entries: Iterable[Entry], owners: Mapping[str, str], by: str = "key") -> list[dict[str, object]]:
    """Sum entries per group (pure): ``key`` = (key, model), ``day`` = period, ``model``, ``owner``."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: one of {', '.join(GROUPINGS)}")
    sums: dict[tuple[str, ...], Counts] = {}
    for e in entries:
        who = owner_of(e, owners)
        k: tuple[str, ...] = {"key": (who, e.key_id, e.model), "day": (e.period,), "model": (e.model,),
                              "owner": (who,)}[by]
        c = sums.get(k)
        if c is None:
            c = sums[k] = Counts()
        c.add(e.counts)
    names = {"key": ("owner", "key_id", "model"), "day": ("day",), "model": ("model",), "owner": ("owner",)}[by]
    rows: list[dict[str, object]] = []
    for k in sorted(sums):
        c = sums[k]
        row: dict[str, object] = dict(zip(names, k, strict=True))
        row.update(requests=c.requests, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                   total_tokens=c.prompt_tokens + c.completion_tokens, errors=c.errors)
        rows.append(row)
    return rows


async def read_usage(store: EtcdStore, keys: Keys) -> UsageRead:
    """Every usage record (UsageBlocks and legacy) and the key owners, at one revision."""
    kvs, rev = await store.list_prefix(keys.accounting)
    legacy_kvs, _ = await store.list_prefix(keys.usage, revision=rev)
    key_kvs, _ = await store.list_prefix(keys.api_keys, revision=rev)
    read = UsageRead()
    blocks: list[tuple[str, UsageBlock]] = []
    for kv in kvs:
        if keys.parse_usage_block_key(kv.key) is None:
            continue  # the compactor's leader key
        try:
            blocks.append((kv.key, decode_record(UsageBlock, kv)))
        except RecordDecodeError as exc:
            read.undecodable.append(str(exc))
    legacy = []
    for kv in legacy_kvs:
        try:
            legacy.append(decode_record(Usage, kv))
        except RecordDecodeError as exc:
            read.undecodable.append(str(exc))
    read.entries = entries_of(blocks, legacy, read.undecodable)
    for kv in key_kvs:
        try:
            rec = decode_record(ApiKey, kv)
        except RecordDecodeError:
            continue  # a broken key record hides no usage: owners fall back to what usage recorded
        read.owners[rec.key_id] = rec.owner
    return read
