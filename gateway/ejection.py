"""Passive ejection that a client cannot steer: pure bookkeeping with an injectable clock.

Who is at fault when an attempt fails? A request whose body makes every engine answer 500 (a
1,000-deep JSON nesting, say) must not get healthy instances ejected, nor cost the engines one
attempt per instance. So, per request (``Attribution``):

    connect failed        ─▶ the instance's fault (nothing reached it): blame it, try another
    engine answered 4xx   ─▶ the request's fault: nothing to blame, the answer is relayed
    answer failed (5xx, reset or timeout after the request was sent)
        first time        ─▶ undecided: try ONE other instance
        again elsewhere   ─▶ reproduced: the request's fault; blame nobody, retry no further
        other one worked  ─▶ not reproduced: blame the first instance
        no other to try   ─▶ blame it, as one request's failure

and per instance (``Ejections``): an instance is ejected once failures from ``threshold``
*different* requests (default 2) happened in a row, for ``base_s * 2**(n-1)`` seconds (capped),
where n counts consecutive ejections; a success resets it. One request, however it is built,
never ejects anything on its own. If every candidate is ejected, all are offered anyway (better
a likely failure than a certain 503).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from gateway.table import Endpoint

_anonymous = itertools.count(-1, -1)   # a distinct "request" for each failed() call that names none


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one failed attempt means for its request."""

    retry: bool                       # try another instance
    blame: tuple[str, ...] = ()       # instance ids whose failure counts toward their ejection


class Attribution:
    """Decides, over the attempts of one request, whether failures are the instances' or the request's."""

    __slots__ = ("undecided",)

    def __init__(self) -> None:
        self.undecided: str | None = None   # the instance whose answer failed once, not reproduced yet

    def connect_failed(self, instance_id: str) -> Verdict:
        """The instance could not be reached; the request never left the gateway."""
        return Verdict(retry=True, blame=(instance_id,))

    def answer_failed(self, instance_id: str) -> Verdict:
        """The instance got the request and failed it (5xx, a reset, no answer in time)."""
        if self.undecided is None:
            self.undecided = instance_id
            return Verdict(retry=True)
        self.undecided = None   # reproduced on a second instance: the request itself is the cause
        return Verdict(retry=False)

    def answered(self) -> tuple[str, ...]:
        """An instance answered (below 500): an earlier failed answer was that instance's fault."""
        blamed, self.undecided = self.undecided, None
        return (blamed,) if blamed else ()

    def gave_up(self) -> tuple[str, ...]:
        """No other instance could be tried: a lone failed answer counts against its instance."""
        return self.answered()


@dataclass
class _Health:
    requests: set[int] = field(default_factory=set)   # distinct requests that failed in a row (< threshold)
    ejections: int = 0
    until: float = 0.0


class Ejections:
    """Failure streaks and ejection windows per instance id."""

    def __init__(self, *, threshold: int = 2, base_s: float = 1.0, max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._health: dict[str, _Health] = {}

    def failed(self, instance_id: str, request: int | None = None) -> bool:
        """Record a failure of ``request`` (an id unique per request; None: a request of its own);
        True when it ejects the instance now."""
        h = self._health.setdefault(instance_id, _Health())
        h.requests.add(next(_anonymous) if request is None else request)
        if len(h.requests) < self.threshold or h.until > self._clock():
            return False
        h.ejections += 1
        h.requests.clear()
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
