"""Usage counters per (key, model) of one period, their periods, and their etcd encoding (pure).

A ``Block`` is what one ``UsageBlock`` record holds: counters per (key id, model) and the owner of
each key. Periods are UTC days (``2026-12-01``) or, once folded, months (``2026-12``).

    UsageBook (gateway) ─▶ Block per day ─▶ encode() ─▶ accounting/writers/<writer>/<day>/<part>
    compactor ─▶ decode() ─▶ Block.add ─▶ encode() ─▶ accounting/merged/<period>/<part>
    legacy Usage (usage/<key>/<model>/<gw>) ─▶ from_legacy() ─▶ Block of the day it was last updated

Records are split into *parts* so that no record comes near etcd's request limit (1.5 MiB by
default): a pair stays in the part it was first put in; new pairs go to the last part until it
holds ``PART_BYTES``, then to a new one (``place``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from controlplane.pb import Usage, UsageBlock, UsageCell

Pair = tuple[str, str]           # (key id, model)

#: A part is closed to new pairs at this estimated size: a flush writes at most two parts in one
#: transaction, and a fold at most ``TXN_BYTES``, both well under etcd's 1.5 MiB request limit.
PART_BYTES = 256 * 1024
#: The most bytes of values one fold transaction writes.
TXN_BYTES = 1024 * 1024
#: Estimated bytes of a cell besides its strings (tag, length, indexes, four varints).
CELL_OVERHEAD = 24


class BlockError(ValueError):
    """A UsageBlock's cells point outside its string tables (a corrupt or foreign record)."""


@dataclass(slots=True)
class Counts:
    """Counters of one (key, model) pair."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def add(self, other: Counts) -> None:
        """Add ``other`` in place."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors

    def sub(self, other: Counts) -> None:
        """Subtract ``other`` in place (never below zero: what was folded cannot exceed what we counted)."""
        self.requests = max(0, self.requests - other.requests)
        self.prompt_tokens = max(0, self.prompt_tokens - other.prompt_tokens)
        self.completion_tokens = max(0, self.completion_tokens - other.completion_tokens)
        self.errors = max(0, self.errors - other.errors)

    @property
    def zero(self) -> bool:
        """True when every counter is 0."""
        return not (self.requests or self.prompt_tokens or self.completion_tokens or self.errors)

    def copy(self) -> Counts:
        """An independent copy."""
        return Counts(self.requests, self.prompt_tokens, self.completion_tokens, self.errors)

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(requests, prompt tokens, completion tokens, errors)."""
        return self.requests, self.prompt_tokens, self.completion_tokens, self.errors


@dataclass(slots=True)
class Block:
    """Counters per (key id, model) and each key's owner: the contents of one UsageBlock."""

    cells: dict[Pair, Counts] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def count(self, pair: Pair, counts: Counts, owner: str = "") -> None:
        """Add ``counts`` to ``pair`` (remembering the key's owner when given)."""
        c = self.cells.get(pair)
        if c is None:
            c = self.cells[pair] = Counts()
        c.add(counts)
        if owner:
            self.owners[pair[0]] = owner

    def add(self, other: Block) -> None:
        """Add every cell of ``other``."""
        for pair, counts in other.cells.items():
            self.count(pair, counts, other.owners.get(pair[0], ""))

    def subtract(self, other: Block) -> None:
        """Subtract ``other``'s cells; cells that reach zero are dropped."""
        for pair, counts in other.cells.items():
            c = self.cells.get(pair)
            if c is not None:
                c.sub(counts)
                if c.zero:
                    del self.cells[pair]

    def copy(self) -> Block:
        """A deep copy."""
        return Block({p: c.copy() for p, c in self.cells.items()}, dict(self.owners))

    def total(self) -> Counts:
        """The sum of every cell."""
        out = Counts()
        for c in self.cells.values():
            out.add(c)
        return out

    def __len__(self) -> int:
        return len(self.cells)

    def estimated_bytes(self) -> int:
        """An upper estimate of the encoded size."""
        return sum(pair_bytes(p) for p in self.cells)


def pair_bytes(pair: Pair) -> int:
    """Estimated encoded bytes of one cell (its strings counted in full: an upper bound)."""
    return len(pair[0]) + len(pair[1]) + CELL_OVERHEAD


# -- periods ---------------------------------------------------------------------------------------


def day_of(unix_s: float) -> str:
    """The UTC day of a unix time, ``YYYY-MM-DD``."""
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%d")


def month_of(period: str) -> str:
    """The month ``YYYY-MM`` of a day or month period."""
    return period[:7]


def is_day(period: str) -> bool:
    """True for ``YYYY-MM-DD`` periods (False for months)."""
    return len(period) == 10


def period_bounds(period: str) -> tuple[dt.date, dt.date]:
    """The first and last UTC day a period covers; ValueError when it is neither a day nor a month."""
    if is_day(period):
        d = dt.date.fromisoformat(period)
        return d, d
    if len(period) == 7:
        first = dt.date.fromisoformat(period + "-01")
        nxt = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        return first, nxt - dt.timedelta(days=1)
    raise ValueError(f"not a usage period (YYYY-MM-DD or YYYY-MM): {period!r}")


def days_before(unix_s: float, days: int) -> str:
    """The UTC day ``days`` days before the day of ``unix_s``."""
    return (dt.datetime.fromtimestamp(unix_s, dt.UTC).date() - dt.timedelta(days=days)).isoformat()


# -- encoding --------------------------------------------------------------------------------------


def encode(block: Block, *, period: str, writer: str = "", gateway_id: str = "", updated_unix_ms: int = 0,
           seq: int = 0, final: bool = False, folded: bool = False) -> UsageBlock:
    """The UsageBlock of ``block`` (string tables sorted, so equal blocks encode to equal bytes)."""
    key_ids = sorted({k for k, _ in block.cells})
    models = sorted({m for _, m in block.cells})
    ki = {k: i for i, k in enumerate(key_ids)}
    mi = {m: i for i, m in enumerate(models)}
    cells = [UsageCell(key=ki[k], model=mi[m], requests=c.requests, prompt_tokens=c.prompt_tokens,
                       completion_tokens=c.completion_tokens, errors=c.errors)
             for (k, m), c in sorted(block.cells.items())]
    return UsageBlock(period=period, writer=writer, gateway_id=gateway_id, updated_unix_ms=updated_unix_ms, seq=seq,
                      key_ids=key_ids, owners=[block.owners.get(k, "") for k in key_ids], models=models, cells=cells,
                      final=final, folded=folded)


def decode(msg: UsageBlock) -> Block:
    """The Block a UsageBlock holds; BlockError when a cell points outside the string tables."""
    keys, models, owners = list(msg.key_ids), list(msg.models), list(msg.owners)
    block = Block()
    for cell in msg.cells:
        if cell.key >= len(keys) or cell.model >= len(models):
            raise BlockError(f"cell ({cell.key}, {cell.model}) outside the tables ({len(keys)} keys, "
                             f"{len(models)} models)")
        block.count((keys[cell.key], models[cell.model]),
                    Counts(cell.requests, cell.prompt_tokens, cell.completion_tokens, cell.errors))
    for i, k in enumerate(keys):
        if i < len(owners) and owners[i]:
            block.owners[k] = owners[i]
    return block


def from_legacy(rec: Usage) -> tuple[str, Block]:
    """A legacy ``usage/<key>/<model>/<gateway>`` record (lifetime totals) as a Block of the day it
    was last updated: the old records carry no per-day breakdown."""
    block = Block()
    block.count((rec.key_id, rec.model),
                Counts(rec.requests, rec.prompt_tokens, rec.completion_tokens, rec.errors))
    return day_of(rec.updated_unix_ms / 1000 if rec.updated_unix_ms > 0 else 0), block


# -- parts -----------------------------------------------------------------------------------------


def place(parts: Mapping[int, Block], incoming: Iterable[Pair], part_bytes: int = PART_BYTES) -> dict[Pair, int]:
    """The part each incoming pair belongs to: the part that holds it already; else the last part
    while it has room (``part_bytes``), else a new part after it (pure, deterministic)."""
    where: dict[Pair, int] = {}
    for idx, block in parts.items():
        for pair in block.cells:
            where[pair] = idx
    last = max(parts, default=0)
    size = parts[last].estimated_bytes() if last in parts else 0
    out: dict[Pair, int] = {}
    for pair in incoming:
        found = where.get(pair)
        if found is None:
            need = pair_bytes(pair)
            if size + need > part_bytes and size > 0:
                last, size = last + 1, 0
            found = where[pair] = last
            size += need
        out[pair] = found
    return out


def split_by_part(block: Block, where: Mapping[Pair, int]) -> Iterator[tuple[int, Block]]:
    """``block``'s cells grouped by the part ``where`` assigns them, in part order."""
    groups: dict[int, Block] = {}
    for pair, counts in block.cells.items():
        g = groups.setdefault(where[pair], Block())
        g.count(pair, counts, block.owners.get(pair[0], ""))
    for idx in sorted(groups):
        yield idx, groups[idx]
