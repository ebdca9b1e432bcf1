"""Per-key rate limits, enforced locally with a fleet-aware share: a pure core, clock injected.

Each ApiKey may carry ``requests_per_minute`` and ``tokens_per_minute`` (0 = unlimited). With N
live gateways (``gateways/`` in etcd, N >= 1) every gateway enforces ``limit / N`` on its own,
with a token bucket per key and kind:

    capacity = max(limit / N, 1)      burst: one gateway's share of a minute
    refill   = limit / N / 60 per s   smooth, so a denied client is told when to come back

Requests take 1 from the requests bucket before forwarding. Tokens are charged after the
response (prompt + completion from its ``usage``), so the tokens bucket may go negative; new
requests are denied while it is. No shared counters, no etcd round trip per request: the cost
is that a client whose traffic lands unevenly on the gateways gets less than its limit (see
docs/gateway.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from controlplane.pb import ApiKey

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(slots=True)
class TokenBucket:
    """A token bucket: ``level`` refills at ``rate`` per second up to ``capacity``."""

    capacity: float
    rate: float
    level: float
    updated: float

    @classmethod
    def full(cls, capacity: float, rate: float, now: float) -> TokenBucket:
        """A bucket that starts with its whole burst available."""
        return cls(capacity, rate, capacity, now)

    def refill(self, now: float) -> None:
        """Add what accrued since the last update (time never runs backwards here)."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def resize(self, capacity: float, rate: float, now: float) -> None:
        """New share (limit or fleet size changed): keep the level, clipped to the new capacity."""
        self.refill(now)
        self.capacity, self.rate = capacity, rate
        self.level = min(self.level, capacity)

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if it is there; False (and nothing taken) otherwise."""
        self.refill(now)
        if self.level >= amount:
            self.level -= amount
            return True
        return False

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` unconditionally (the level may go negative)."""
        self.refill(now)
        self.level -= amount

    def seconds_until(self, level: float, now: float) -> float:
        """Seconds until the bucket holds at least ``level`` (0 when it does now)."""
        self.refill(now)
        missing = level - self.level
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limiter decided for one request, with what the rate-limit headers report."""

    allowed: bool
    kind: str = ""                  # REQUESTS or TOKENS: the limit that denied it
    retry_after_s: int = 0          # whole seconds, >= 1 when denied
    headers: dict[str, str] = field(default_factory=dict)


ALLOWED = Verdict(True)


@dataclass(slots=True)
class _KeyBuckets:
    rpm: int = 0
    tpm: int = 0
    fleet: int = 0
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None


def share(limit: int, fleet_size: int) -> tuple[float, float]:
    """(capacity, refill per second) of one gateway's bucket for a per-minute ``limit``."""
    per_gateway = limit / max(1, fleet_size)
    return max(per_gateway, 1.0), per_gateway / 60.0


class RateLimiter:
    """Token buckets per key id; ``fleet_size`` is kept current by the fleet watch."""

    def __init__(self, fleet_size: int = 1) -> None:
        self.fleet_size = max(1, fleet_size)
        self._keys: dict[str, _KeyBuckets] = {}

    def set_fleet_size(self, n: int) -> None:
        """Live gateways (at least 1); buckets are resized lazily on their next use."""
        self.fleet_size = max(1, n)

    def _buckets(self, key: ApiKey, now: float) -> _KeyBuckets:
        kb = self._keys.get(key.key_id)
        if kb is None:
            kb = self._keys[key.key_id] = _KeyBuckets()
        rpm, tpm, n = key.requests_per_minute, key.tokens_per_minute, self.fleet_size
        if (kb.rpm, kb.tpm, kb.fleet) != (rpm, tpm, n):
            kb.requests = _resized(kb.requests, rpm, n, now)
            kb.tokens = _resized(kb.tokens, tpm, n, now)
            kb.rpm, kb.tpm, kb.fleet = rpm, tpm, n
        return kb

    def admit(self, key: ApiKey, now: float) -> Verdict:
        """Take one request from ``key``'s buckets, or say why not and for how long."""
        if not key.requests_per_minute and not key.tokens_per_minute:
            return ALLOWED
        kb = self._buckets(key, now)
        headers: dict[str, str] = {}
        tokens = kb.tokens
        if tokens is not None:
            tokens.refill(now)
            headers.update(self._headers(TOKENS, key.tokens_per_minute, tokens, now))
            if tokens.level < 0:
                wait = tokens.seconds_until(0.0, now)
                return Verdict(False, TOKENS, _whole_seconds(wait), headers)
        requests = kb.requests
        if requests is not None:
            taken = requests.take(1.0, now)
            headers.update(self._headers(REQUESTS, key.requests_per_minute, requests, now))
            if not taken:
                return Verdict(False, REQUESTS, _whole_seconds(requests.seconds_until(1.0, now)), headers)
        return Verdict(True, headers=headers)

    def charge_tokens(self, key: ApiKey, tokens: int, now: float) -> None:
        """Charge the tokens a finished request used (no-op without a tokens limit)."""
        if key.tokens_per_minute and tokens > 0:
            bucket = self._buckets(key, now).tokens
            if bucket is not None:
                bucket.charge(float(tokens), now)

    def forget(self, key_ids: set[str]) -> None:
        """Drop buckets of keys that no longer exist."""
        for kid in [k for k in self._keys if k not in key_ids]:
            del self._keys[kid]

    def _headers(self, kind: str, limit: int, bucket: TokenBucket, now: float) -> dict[str, str]:
        # OpenAI reports limit and remaining for the whole key; this gateway only knows its share,
        # so "remaining" is the fleet-wide estimate: local level times the fleet size.
        remaining = max(0, min(limit, math.floor(max(bucket.level, 0.0) * self.fleet_size)))
        return {
            f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": format_duration(bucket.seconds_until(bucket.capacity, now)),
        }


def _resized(bucket: TokenBucket | None, limit: int, fleet: int, now: float) -> TokenBucket | None:
    if not limit:
        return None
    capacity, rate = share(limit, fleet)
    if bucket is None:
        return TokenBucket.full(capacity, rate, now)
    bucket.resize(capacity, rate, now)
    return bucket


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
