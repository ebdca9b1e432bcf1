"""Choosing an instance: a pure function of the candidates, their load and a random source.

Power of two choices over *weighted* outstanding requests: draw two distinct candidates, take
the one with the lower ``(in_flight + 1) / weight``. It is nearly as good as a global least-loaded
choice and never herds every gateway onto the same instance (each gateway sees only its own
in-flight counts). Instances in ``exclude`` (already tried for this request) and ejected ones are
skipped; when nothing is left, the answer is None.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence

from gateway.table import Endpoint


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
