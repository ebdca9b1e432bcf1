"""Usage per (key, model, day) and demand per model: in-memory counters, written to etcd by fleet.py.

    request ends ─▶ UsageBook.record(key, owner, model, tokens, error, now)   today's Block, part dirty
                 └▶ DemandMeter.finished(model, tokens, now)                  60 one-second buckets

``UsageBook`` keeps this gateway process's counters per UTC day, split into parts (a pair stays
in its part; a part closes to new pairs at ``PART_BYTES``). Each flush writes the dirty parts,
oldest first and at most ``max_parts`` of them, to ``accounting/writers/<writer>/<day>/<part>``:
cumulative within the day, so one record per part and day, whatever the number of pairs.
``writer`` is the gateway id plus a random suffix per process start, so a restarted gateway (a
pinned ``--id`` or not) never overwrites what an earlier process wrote: the fleet's compactor
folds that into ``accounting/merged/`` (controlplane/accounting/compact.py).

Every write is a compare-and-swap on the mod revision of the part's last confirmed write. When
the compare fails, the caller reads the key and ``resolve`` reconciles with what etcd holds:
our own write whose answer was lost (recognised by its ``seq``), what the compactor left of one of
our writes after folding it (``folded``: we subtract exactly what it moved), or anything else
(kept, with only our increments since our last write added on top), so a fold, a lost answer or
a day recreated after a clock step never counts anything twice or not at all. A day is
dropped from memory once it is over and written (``drop_finished``). Both classes are pure: the
caller passes the clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from controlplane.accounting.blocks import PART_BYTES, Block, Counts, Pair, day_of, decode, encode, pair_bytes
from controlplane.pb import Demand, UsageBlock
from gateway.sse import TokenUsage

#: Unknown-outcome writes remembered per part (each later write supersedes the earlier ones).
MAX_ATTEMPTS = 8


def new_writer_id(gateway_id: str) -> str:
    """This process's usage writer: the gateway id and a random suffix (a restart is a new writer)."""
    return f"{gateway_id}@{secrets.token_hex(4)}"


@dataclass(slots=True)
class _Part:
    """One part of one day: what we counted, what etcd holds, and writes in flight or unanswered."""

    current: Block = field(default_factory=Block)
    written: Block = field(default_factory=Block)      # the contents of our last confirmed write
    mod_revision: int = 0                               # of that write; 0: nothing of ours there
    written_seq: int = 0                                # its seq
    dirty: bool = False
    last_write: float = 0.0                             # clock of the last confirmed write
    size: int = 0                                       # estimated bytes (closes at PART_BYTES)
    attempts: dict[int, Block] = field(default_factory=dict)   # seq -> contents sent, answer lost


@dataclass(slots=True)
class _Day:
    parts: dict[int, _Part] = field(default_factory=dict)
    where: dict[Pair, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PartWrite:
    """One part to write: the snapshot sent, under ``seq``, guarded by ``expected_mod``."""

    day: str
    part: int
    seq: int
    block: Block
    expected_mod: int
    final: bool = False

    def record(self, writer: str, gateway_id: str, now_ms: int) -> UsageBlock:
        """The UsageBlock this write puts."""
        return encode(self.block, period=self.day, writer=writer, gateway_id=gateway_id, updated_unix_ms=now_ms,
                      seq=self.seq, final=self.final)


class UsageBook:
    """This gateway process's usage per (key, model, day); see the module docstring."""

    def __init__(self, gateway_id: str, writer: str | None = None, *, part_bytes: int = PART_BYTES) -> None:
        self.gateway_id = gateway_id
        self.writer = writer or new_writer_id(gateway_id)
        self.part_bytes = part_bytes
        self.days: dict[str, _Day] = {}
        self._seq = 0
        self._day_cache = (-1, "")

    # -- counting (hot path) -----------------------------------------------------------------

    def record(self, key_id: str, owner: str, model: str, usage: TokenUsage | None, *, error: bool,
               now_s: float) -> None:
        """Count one finished request on the UTC day of ``now_s``."""
        second = int(now_s)
        if self._day_cache[0] != second:
            self._day_cache = (second, day_of(second))
        day = self._day_cache[1]
        d = self.days.get(day)
        if d is None:
            d = self.days[day] = _Day()
        pair = (key_id, model)
        idx = d.where.get(pair)
        if idx is None:
            idx = self._place(d, pair)
        part = d.parts[idx]
        c = part.current.cells.get(pair)
        if c is None:
            c = part.current.cells[pair] = Counts()
        c.requests += 1
        if usage is not None:
            c.prompt_tokens += usage.prompt_tokens
            c.completion_tokens += usage.completion_tokens
        if error:
            c.errors += 1
        if owner and part.current.owners.get(key_id) != owner:
            part.current.owners[key_id] = owner
        part.dirty = True

    def _place(self, d: _Day, pair: Pair) -> int:
        need = pair_bytes(pair)
        last = max(d.parts, default=0)
        part = d.parts.get(last)
        if part is None:
            part = d.parts[last] = _Part()
        elif part.size + need > self.part_bytes and part.size > 0:
            last += 1
            part = d.parts[last] = _Part()
        part.size += need
        d.where[pair] = last
        return last

    # -- flushing ----------------------------------------------------------------------------

    def pending(self, max_parts: int | None = None, *, final: bool = False) -> list[PartWrite]:
        """Parts to write now, least recently written first (at most ``max_parts``). With ``final``
        (a clean stop) every part that holds anything, marked final, so it is folded at once."""
        chosen = [(p.last_write, day, idx, p) for day, d in self.days.items() for idx, p in d.parts.items()
                  if p.dirty or p.attempts or (final and (len(p.current) or p.mod_revision))]
        chosen.sort(key=lambda t: (t[0], t[1], t[2]))
        if max_parts is not None and not final:
            chosen = chosen[:max_parts]
        out = []
        for _, day, idx, part in chosen:
            self._seq += 1
            out.append(PartWrite(day, idx, self._seq, part.current.copy(), part.mod_revision, final))
        return out

    def written(self, writes: Iterable[PartWrite], revision: int, now: float) -> None:
        """These writes were committed at ``revision``."""
        for w in writes:
            part = self.days[w.day].parts[w.part]
            part.written, part.written_seq, part.mod_revision, part.last_write = w.block, w.seq, revision, now
            part.attempts.clear()
            part.dirty = _changed(part.current, w.block)

    def unanswered(self, writes: Iterable[PartWrite]) -> None:
        """These writes may or may not have been committed (etcd did not answer)."""
        for w in writes:
            part = self.days[w.day].parts[w.part]
            part.attempts[w.seq] = w.block
            while len(part.attempts) > MAX_ATTEMPTS:
                del part.attempts[min(part.attempts)]
            part.dirty = True

    def resolve(self, w: PartWrite, found: UsageBlock | None, mod_revision: int) -> bool:
        """The compare of ``w`` failed; etcd holds ``found`` (None: nothing) at ``mod_revision``.
        Returns False when ``found`` is not ours (another writer's record under our key)."""
        part = self.days[w.day].parts[w.part]
        ours = found is None or found.writer == self.writer
        held = decode(found) if found is not None else Block()
        base: Block | None = None          # the contents of our write that ``found`` derives from
        if found is not None and ours and found.seq:
            base = part.attempts.get(found.seq)
            if base is None and found.seq == part.written_seq:
                base = part.written
        if base is not None and found is not None and found.folded:
            part.current.subtract(base)    # the compactor moved write `seq` into merged/ ...
            part.current.add(held)         # ... except what it left here
        elif base is not None:
            held = base                    # a write whose answer was lost did commit
        else:                              # anything else: keep what etcd holds, add our increments
            part.current.subtract(part.written)
            part.current.add(held)
        part.written, part.written_seq = held, found.seq if found is not None else 0
        part.mod_revision = mod_revision if found is not None else 0
        part.attempts.clear()
        part.dirty = True
        return ours

    def drop_finished(self, today: str) -> list[str]:
        """Forget days before ``today`` whose every part is written; returns them."""
        done = [day for day, d in self.days.items()
                if day < today and not any(p.dirty or p.attempts for p in d.parts.values())]
        for day in done:
            del self.days[day]
        return done

    @property
    def dirty_parts(self) -> int:
        """Parts with counts not yet confirmed in etcd."""
        return sum(1 for d in self.days.values() for p in d.parts.values() if p.dirty or p.attempts)

    def totals(self) -> Counts:
        """Everything counted and still in memory (tests, metrics)."""
        out = Counts()
        for d in self.days.values():
            for p in d.parts.values():
                out.add(p.current.total())
        return out


def _changed(current: Block, sent: Block) -> bool:
    if len(current) != len(sent):
        return True
    return any(sent.cells.get(pair) != c for pair, c in current.cells.items())


class _Window:
    """``size`` one-second buckets of (requests, prompt tokens, completion tokens)."""

    __slots__ = ("completion", "prompt", "requests", "stamp")

    def __init__(self, size: int) -> None:
        self.stamp = [-1] * size
        self.requests = [0] * size
        self.prompt = [0] * size
        self.completion = [0] * size

    def slot(self, second: int) -> int:
        i = second % len(self.stamp)
        if self.stamp[i] != second:
            self.stamp[i] = second
            self.requests[i] = self.prompt[i] = self.completion[i] = 0
        return i

    def sums(self, second: int) -> tuple[int, int, int]:
        oldest = second - len(self.stamp) + 1
        r = p = c = 0
        for i, stamp in enumerate(self.stamp):
            if oldest <= stamp <= second:
                r += self.requests[i]
                p += self.prompt[i]
                c += self.completion[i]
        return r, p, c


class DemandMeter:
    """Requests and tokens per second per model over a sliding window, and requests in flight."""

    def __init__(self, started: float, window_s: int = 60) -> None:
        self.window_s = max(1, window_s)
        self.started = started
        self._windows: dict[str, _Window] = {}
        self.in_flight: dict[str, int] = {}

    def _window(self, model: str) -> _Window:
        w = self._windows.get(model)
        if w is None:
            w = self._windows[model] = _Window(self.window_s)
        return w

    def arrived(self, model: str, now: float) -> None:
        """A request for ``model`` was admitted (it counts as demand even if it then fails)."""
        w = self._window(model)
        w.requests[w.slot(int(now))] += 1
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def finished(self, model: str, usage: TokenUsage | None, now: float) -> None:
        """The request ended; its tokens count at the second they became known."""
        left = self.in_flight.get(model, 1) - 1
        if left > 0:
            self.in_flight[model] = left
        else:
            self.in_flight.pop(model, None)
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            w = self._window(model)
            i = w.slot(int(now))
            w.prompt[i] += usage.prompt_tokens
            w.completion[i] += usage.completion_tokens

    def snapshot(self, gateway_id: str, now: float, now_ms: int) -> dict[str, Demand]:
        """Demand per model with anything in the window or in flight; idle models are dropped."""
        second = int(now)
        span = float(min(self.window_s, max(1.0, now - self.started)))
        out: dict[str, Demand] = {}
        for model in list(self._windows):
            r, p, c = self._windows[model].sums(second)
            flying = self.in_flight.get(model, 0)
            if not (r or p or c or flying):
                del self._windows[model]
                continue
            out[model] = Demand(model=model, gateway_id=gateway_id, requests_per_second=r / span,
                                prompt_tokens_per_second=p / span, completion_tokens_per_second=c / span,
                                window_seconds=self.window_s, updated_unix_ms=now_ms, in_flight=flying)
        for model, flying in self.in_flight.items():
            if model not in out and flying:
                out[model] = Demand(model=model, gateway_id=gateway_id, window_seconds=self.window_s,
                                    updated_unix_ms=now_ms, in_flight=flying)
        return out
