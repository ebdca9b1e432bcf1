"""Per-key rate limits for the whole fleet: sliding windows with demand-following shares (pure, clock injected).

Each ApiKey may carry ``requests_per_minute`` and ``tokens_per_minute`` (0 = unlimited). Every
gateway counts, per key, what it admitted in one-second buckets over the last ``WINDOW_S`` s (the
current second and the 60 before it: never less than a minute), and how many requests it was
*asked* for over the last ``DEMAND_S`` s. It publishes both in its GatewayRecord (gateway/fleet.py,
every publish interval while it has traffic) and reads everyone else's. Its quota for a key is

    share = own published demand / everyone's published demand       (1/N before anyone published;
                                                                      at least 1/N while ours is unpublished)
    quota = min(share * limit,  limit - what the others admitted in their windows)

and a request is admitted while ``admitted in my window + 1 <= quota`` (tokens: while ``tokens
charged in my window < quota``; a response may overdraw, since its cost is known only at the
end). The shares of all gateways are computed from the same published numbers, so they add up to
1 and a burst on every gateway at once cannot exceed the limit; the second term stops a gateway
whose share just grew from spending what another gateway admitted moments ago. What is left is
the publication lag: admissions of the last publish interval that others have not seen yet.
docs/gateway.md derives the bound (and measures it); when etcd is unreachable for longer than
the caller's staleness limit (``fresh=False``) every gateway falls back to ``limit / N``.

No shared counters, no etcd round trip per request: admission is a few list operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.pb import ApiKey, KeyLoad

REQUESTS = "requests"
TOKENS = "tokens"
WINDOW_S = 60
BUCKETS = WINDOW_S + 1          # a bucket counts until its second is this old: windows never undercount
DEMAND_S = 10                   # demand (requests asked for) is averaged over this many seconds
SHARE_RETRY_S = 2               # Retry-After when only the shares can make room (they move each publication)


class _Ring:
    """``BUCKETS`` one-second buckets of a count."""

    __slots__ = ("stamp", "value")

    def __init__(self) -> None:
        self.stamp = [-1] * BUCKETS
        self.value = [0] * BUCKETS

    def add(self, second: int, amount: int) -> None:
        i = second % BUCKETS
        if self.stamp[i] != second:
            self.stamp[i] = second
            self.value[i] = 0
        self.value[i] += amount

    def total(self, second: int, span: int = BUCKETS) -> int:
        """The sum of the buckets of the last ``span`` seconds (this one included)."""
        oldest = second - span + 1
        return sum(v for s, v in zip(self.stamp, self.value, strict=True) if oldest <= s <= second)

    def oldest_first(self, second: int) -> list[tuple[int, int]]:
        """(second, count) of the non-empty buckets in the window, oldest first."""
        oldest = second - BUCKETS + 1
        return sorted((s, v) for s, v in zip(self.stamp, self.value, strict=True) if oldest <= s <= second and v)


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """What the other gateways published for one key, summed."""

    admitted_requests: int = 0
    admitted_tokens: int = 0
    request_demand: float = 0.0
    token_demand: float = 0.0


NO_PEERS = PeerLoad()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limiter decided for one request, with what the rate-limit headers report."""

    allowed: bool
    kind: str = ""                  # REQUESTS or TOKENS: the limit that denied it
    retry_after_s: int = 0          # whole seconds, >= 1 when denied
    headers: dict[str, str] = field(default_factory=dict)


ALLOWED = Verdict(True)


@dataclass(slots=True)
class _KeyState:
    admitted: _Ring = field(default_factory=_Ring)
    tokens: _Ring = field(default_factory=_Ring)
    asked: _Ring = field(default_factory=_Ring)


def share_of(own_published: float, others: float, members: int, *, asking: bool) -> float:
    """This gateway's share of a key (pure): its published demand over everyone's; 1/N while nobody
    published; at least 1/N while we are asked but have not published yet (a gateway new to the key)."""
    n = max(1, members)
    total = own_published + others
    s = own_published / total if total > 0 else 1.0 / n
    if own_published <= 0 and asking:
        s = max(s, 1.0 / n)
    return s


def quota_of(limit: int, share: float, others_admitted: float) -> float:
    """What this gateway may have admitted in its window (pure)."""
    return max(0.0, min(share * limit, limit - others_admitted))


class RateLimiter:
    """Sliding-window limits per key id; the fleet member feeds it the others' published load."""

    def __init__(self, fleet_size: int = 1) -> None:
        self.fleet_size = max(1, fleet_size)
        self._keys: dict[str, _KeyState] = {}
        self._peers: Mapping[str, PeerLoad] = {}
        self._published: Mapping[str, tuple[float, float]] = {}

    # -- what the fleet tells us ---------------------------------------------------------------

    def set_fleet_size(self, n: int) -> None:
        """Live gateways (at least 1)."""
        self.fleet_size = max(1, n)

    def set_peers(self, peers: Mapping[str, PeerLoad]) -> None:
        """The other gateways' published load per key id (replaces the previous view)."""
        self._peers = peers

    def set_published(self, published: Mapping[str, tuple[float, float]]) -> None:
        """What we published last, per key id: (request demand, token demand)."""
        self._published = published

    # -- requests --------------------------------------------------------------------------------

    def admit(self, key: ApiKey, now: float, *, fresh: bool = True) -> Verdict:
        """Count one request against ``key``'s limits, or say why not and for how long.

        ``fresh`` is False while etcd has been unreachable for too long to trust the others' load:
        the quota is then the static ``limit / N``.
        """
        rpm, tpm = key.requests_per_minute, key.tokens_per_minute
        if not rpm and not tpm:
            return ALLOWED
        second = int(now)
        st = self._keys.get(key.key_id)
        if st is None:
            st = self._keys[key.key_id] = _KeyState()
        st.asked.add(second, 1)
        peer = self._peers.get(key.key_id, NO_PEERS) if fresh else NO_PEERS
        own_rd, own_td = self._published.get(key.key_id, (0.0, 0.0)) if fresh else (0.0, 0.0)
        headers: dict[str, str] = {}
        if tpm:
            q = self._quota(tpm, own_td, peer.token_demand, peer.admitted_tokens, fresh)
            used = st.tokens.total(second)
            headers.update(_headers(TOKENS, tpm, tpm - peer.admitted_tokens - used, st.tokens, now))
            if used >= q:
                return Verdict(False, TOKENS, self._retry(st.tokens, used - q + 1, now), headers)
        if rpm:
            q = self._quota(rpm, own_rd, peer.request_demand, peer.admitted_requests, fresh)
            if q < 1 and rpm - peer.admitted_requests >= 1:
                q = 1.0   # a limit below the fleet size: one request per gateway (docs/gateway.md)
            used = st.admitted.total(second)
            if used + 1 > q:
                headers.update(_headers(REQUESTS, rpm, rpm - peer.admitted_requests - used, st.admitted, now))
                return Verdict(False, REQUESTS, self._retry(st.admitted, used + 1 - q, now), headers)
            headers.update(_headers(REQUESTS, rpm, rpm - peer.admitted_requests - used - 1, st.admitted, now))
        st.admitted.add(second, 1)
        return Verdict(True, headers=headers)

    def _quota(self, limit: int, own: float, others: float, others_admitted: float, fresh: bool) -> float:
        if not fresh:
            return limit / self.fleet_size
        return quota_of(limit, share_of(own, others, self.fleet_size, asking=True), others_admitted)

    @staticmethod
    def _retry(ring: _Ring, need: float, now: float) -> int:
        """Seconds until ``need`` of this gateway's window has left it (SHARE_RETRY_S when that cannot
        make room: then only the shares moving can)."""
        freed = 0
        for second, count in ring.oldest_first(int(now)):
            freed += count
            if freed >= need:
                return _whole_seconds(second + BUCKETS - now)
        return SHARE_RETRY_S

    def charge_tokens(self, key: ApiKey, tokens: int, now: float) -> None:
        """Charge the tokens a finished request used (no-op without a tokens limit)."""
        if key.tokens_per_minute and tokens > 0:
            st = self._keys.get(key.key_id)
            if st is None:
                st = self._keys[key.key_id] = _KeyState()
            st.tokens.add(int(now), tokens)

    # -- what we publish -------------------------------------------------------------------------

    def loads(self, now: float) -> list[KeyLoad]:
        """Per key with anything in its window: admitted requests and tokens, and demand (what the
        fleet's shares follow). Keys with an empty window are forgotten."""
        second = int(now)
        out: list[KeyLoad] = []
        for kid in sorted(self._keys):
            st = self._keys[kid]
            admitted, tokens = st.admitted.total(second), st.tokens.total(second)
            asked = st.asked.total(second, DEMAND_S)
            if not (admitted or tokens or st.asked.total(second)):
                del self._keys[kid]
                continue
            rd = asked / DEMAND_S
            td = rd * (tokens / admitted) if admitted else 0.0
            out.append(KeyLoad(key_id=kid, admitted_requests=admitted, admitted_tokens=tokens,
                               request_demand=round(rd, 3), token_demand=round(td, 1)))
        return out

    def forget(self, key_ids: set[str]) -> None:
        """Drop the windows of keys that no longer exist."""
        for kid in [k for k in self._keys if k not in key_ids]:
            del self._keys[kid]


def peers_from(loads: Iterable[Iterable[KeyLoad]]) -> dict[str, PeerLoad]:
    """Sum the KeyLoads of several gateways per key id (pure)."""
    sums: dict[str, list[float]] = {}
    for one in loads:
        for kl in one:
            s = sums.setdefault(kl.key_id, [0, 0, 0.0, 0.0])
            s[0] += kl.admitted_requests
            s[1] += kl.admitted_tokens
            s[2] += kl.request_demand
            s[3] += kl.token_demand
    return {k: PeerLoad(int(s[0]), int(s[1]), s[2], s[3]) for k, s in sums.items()}


def _headers(kind: str, limit: int, remaining: float, ring: _Ring, now: float) -> dict[str, str]:
    """OpenAI's rate-limit headers: the key's whole limit, what the fleet has left of it (as this
    gateway knows it), and when this gateway's oldest counted use leaves its window."""
    first = ring.oldest_first(int(now))
    reset = first[0][0] + BUCKETS - now if first else 0.0
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, min(limit, math.floor(remaining)))),
        f"x-ratelimit-reset-{kind}": format_duration(max(0.0, reset)),
    }


def _whole_seconds(seconds: float) -> int:
    """Retry-After is an integer: round up, never 0 for a denial, cap at a day."""
    if math.isinf(seconds):
        return 86400
    return max(1, min(86400, math.ceil(seconds - 1e-9)))


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``120ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
