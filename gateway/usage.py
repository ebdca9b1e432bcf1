"""Usage per (key, model) and demand per model: in-memory counters, written to etcd by fleet.py.

    request ends ─▶ UsageBook.record(key_id, model, tokens, error)   cumulative, marked dirty
                 └▶ DemandMeter.finished(model, tokens, now)          60 one-second buckets

``UsageBook`` entries are cumulative since this gateway id first counted them and are written
to ``usage/<key_id>/<model>/<gateway_id>`` without a lease (history must survive the gateway);
``ctl usage`` sums them over gateways. ``DemandMeter`` gives per-model rates over a sliding
window for the ``demand/<model>/<gateway_id>`` records the planner reads. Both are pure: the
caller passes the clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.pb import Demand, Usage
from gateway.sse import TokenUsage


@dataclass(slots=True)
class UsageCounts:
    """Cumulative counters of one (key, model) on one gateway."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0


class UsageBook:
    """Cumulative usage per (key_id, model), with the entries changed since the last flush."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], UsageCounts] = {}
        self._dirty: set[tuple[str, str]] = set()

    def record(self, key_id: str, model: str, usage: TokenUsage | None, *, error: bool) -> None:
        """Count one finished request."""
        k = (key_id, model)
        c = self.entries.get(k)
        if c is None:
            c = self.entries[k] = UsageCounts()
        c.requests += 1
        if usage is not None:
            c.prompt_tokens += usage.prompt_tokens
            c.completion_tokens += usage.completion_tokens
        if error:
            c.errors += 1
        self._dirty.add(k)

    def seed(self, records: Iterable[Usage]) -> None:
        """Continue from counts this gateway id wrote before (a restart with a fixed id)."""
        for r in records:
            c = self.entries.setdefault((r.key_id, r.model), UsageCounts())
            c.requests += r.requests
            c.prompt_tokens += r.prompt_tokens
            c.completion_tokens += r.completion_tokens
            c.errors += r.errors

    def take_dirty(self, gateway_id: str, now_ms: int) -> list[Usage]:
        """Records of the entries changed since the last call (which are then clean)."""
        out = [_usage_record(k, self.entries[k], gateway_id, now_ms) for k in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def mark_dirty(self, records: Iterable[Usage]) -> None:
        """A flush failed: write these entries again next time."""
        self._dirty.update((r.key_id, r.model) for r in records)


def _usage_record(k: tuple[str, str], c: UsageCounts, gateway_id: str, now_ms: int) -> Usage:
    return Usage(key_id=k[0], model=k[1], gateway_id=gateway_id, requests=c.requests,
                 prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, errors=c.errors,
                 updated_unix_ms=now_ms)


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
