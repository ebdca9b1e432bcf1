"""Passive ejection: an instance that fails a request is skipped for a while, longer each time.

Pure bookkeeping with an injectable clock. An instance that fails ``threshold`` times in a row is
ejected for ``base_s * 2**(n-1)`` seconds (capped), where n counts consecutive ejections; a
success resets it. If every candidate is ejected, all are offered anyway (better a likely failure
than a certain 503).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from gateway.table import Endpoint


@dataclass
class _Health:
    failures: int = 0
    ejections: int = 0
    until: float = 0.0


class Ejections:
    """Failure counts and ejection windows per instance id."""

    def __init__(self, *, threshold: int = 1, base_s: float = 1.0, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._health: dict[str, _Health] = {}

    def failed(self, instance_id: str) -> bool:
        """Record a failure; True when it ejects the instance now."""
        h = self._health.setdefault(instance_id, _Health())
        h.failures += 1
        if h.failures < self.threshold or h.until > self._clock():
            return False
        h.ejections += 1
        h.failures = 0
        h.until = self._clock() + min(self.base_s * 2 ** (h.ejections - 1), self.max_s)
        return True

    def succeeded(self, instance_id: str) -> None:
        """A request went through: forget past failures."""
        self._health.pop(instance_id, None)

    def ejected(self, instance_id: str) -> bool:
        """True while the instance's ejection window lasts."""
        h = self._health.get(instance_id)
        return h is not None and h.until > self._clock()

    def remaining(self, instance_id: str) -> float:
        """Seconds of ejection left (0 when not ejected)."""
        h = self._health.get(instance_id)
        return max(0.0, h.until - self._clock()) if h else 0.0

    def filter(self, candidates: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        """Candidates not ejected; all of them when every one is."""
        if not self._health:
            return candidates
        ok = tuple(ep for ep in candidates if not self.ejected(ep.instance_id))
        return ok or candidates

    def forget_missing(self, present: Collection[str]) -> None:
        """Drop state of instances that left the table."""
        for iid in [i for i in self._health if i not in present]:
            del self._health[iid]

    def count_ejected(self) -> int:
        """How many instances are ejected now."""
        now = self._clock()
        return sum(1 for h in self._health.values() if h.until > now)
