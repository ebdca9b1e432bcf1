"""Choosing an instance: a pure function of the candidates, their load and a random source.

Power of two choices over *weighted* outstanding requests: draw two distinct candidates, take
the one with the lower ``(in_flight + 1) / weight``. It is nearly as good as a global least-loaded
choice and never herds every gateway onto the same instance (each gateway sees only its own
in-flight counts). Instances in ``exclude`` (already tried for this request) and ejected ones are
skipped; when nothing is left, the answer is None.

Session affinity (``pick_affinity``): a request carrying ``X-Session-Id`` goes to the instance
with the highest weighted rendezvous (HRW) score for that session, so a conversation keeps
hitting the engine that has its prefix cached. HRW needs no ring and no shared state: every
gateway computes the same answer from the same READY set, and removing an instance remaps only
the sessions that were on it. It falls back to P2C when that instance is overloaded (in-flight
per weight above ``AFFINITY_OVERLOAD_FACTOR`` times the mean plus ``AFFINITY_SLACK``) and on
retries (``exclude`` not empty). Ejected instances are not candidates at all, so their sessions
move to their second HRW choice, just as if the instance had left.
OpenAI's ``user`` body field is deliberately not used: it names an end user, not a conversation,
and is often one constant for a whole application.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence

from gateway.table import Endpoint

SESSION_HEADER = "X-Session-Id"
AFFINITY_OVERLOAD_FACTOR = 2.0
AFFINITY_SLACK = 4.0
_TWO_64 = float(1 << 64)


def load_score(ep: Endpoint, in_flight: Mapping[str, int]) -> float:
    """Outstanding requests per unit of capacity, counting the one about to be sent."""
    return (in_flight.get(ep.instance_id, 0) + 1) / ep.weight


def pick(candidates: Sequence[Endpoint], in_flight: Mapping[str, int], *,
         exclude: Collection[str] = (), rand: Callable[[], float] = random.random) -> Endpoint | None:
    """The instance to send the next request to, or None when no candidate is usable."""
    usable = [ep for ep in candidates if ep.instance_id not in exclude] if exclude else candidates
    n = len(usable)
    if n == 0:
        return None
    if n == 1:
        return usable[0]
    i = int(rand() * n) % n
    j = int(rand() * (n - 1)) % (n - 1)
    if j >= i:
        j += 1
    a, b = usable[i], usable[j]
    # ties go to ``a``, itself a random draw, so idle instances share the traffic evenly
    return a if load_score(a, in_flight) <= load_score(b, in_flight) else b


def pick_random(candidates: Sequence[Endpoint]) -> Endpoint | None:
    """Uniform choice (used by tests as the baseline the balancer must beat)."""
    return random.choice(candidates) if candidates else None


def hrw_score(session: str, ep: Endpoint) -> float:
    """Weighted rendezvous score of ``ep`` for ``session`` (higher wins): ``-weight / ln(u)``.

    ``u`` is a uniform draw in (0, 1) from a hash of (session, instance id), so an instance with
    twice the weight wins twice as many sessions, and the score of one instance never depends on
    the others.
    """
    digest = hashlib.blake2b(f"{session}\x00{ep.instance_id}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _TWO_64
    return -ep.weight / math.log(u)


def affinity_target(candidates: Sequence[Endpoint], session: str) -> Endpoint | None:
    """The instance ``session`` belongs to among ``candidates`` (HRW), None when there are none."""
    best: Endpoint | None = None
    best_score = -1.0
    for ep in candidates:
        score = hrw_score(session, ep)
        if score > best_score or (score == best_score and best is not None and ep.instance_id < best.instance_id):
            best, best_score = ep, score
    return best


def overloaded(ep: Endpoint, candidates: Sequence[Endpoint], in_flight: Mapping[str, int],
               factor: float = AFFINITY_OVERLOAD_FACTOR, slack: float = AFFINITY_SLACK) -> bool:
    """True when ``ep``'s in-flight per unit weight exceeds ``factor`` x the mean plus ``slack``.

    The slack keeps a few concurrent requests of one session on its instance when the pool is
    nearly idle (engines batch them; a cache hit is worth more than an idle neighbour).
    """
    if len(candidates) < 2:
        return False
    mean = sum(in_flight.get(c.instance_id, 0) / c.weight for c in candidates) / len(candidates)
    return in_flight.get(ep.instance_id, 0) / ep.weight > factor * mean + slack


def pick_affinity(candidates: Sequence[Endpoint], in_flight: Mapping[str, int], session: str | None, *,
                  exclude: Collection[str] = (), rand: Callable[[], float] = random.random) -> Endpoint | None:
    """The session's HRW instance unless it is overloaded or this is a retry; P2C otherwise."""
    if not session or exclude or len(candidates) < 2:
        return pick(candidates, in_flight, exclude=exclude, rand=rand)
    target = affinity_target(candidates, session)
    if target is None or overloaded(target, candidates, in_flight):
        return pick(candidates, in_flight, exclude=exclude, rand=rand)
    return target
