"""The HTTP edge's limits and the per-connection deadline clock: pure bookkeeping, clock passed in.

Every input the edge accepts has a bound with a default and a ``ctl gateway`` flag
(docs/security.md lists them all with the reasons for the defaults):

    accept ─▶ HEAD (head_timeout_s from accept, or from the first byte of a later request)
               │ head complete
               ▼
             BODY (body_timeout_s from the end of the head) ─▶ answered (no reading deadline)
               │ rejected before/while its body arrives                │ queue empty
               ▼                                                       ▼
             LINGER (linger_s: the rest of the body is discarded,   IDLE (keepalive_timeout_s)
                     then the connection closes)                       │ next request's first byte
                                                                       └─▶ HEAD
    independent of those: BLOCKED (write_timeout_s while the client does not read our answer)

A connection carries its phase and when it entered it (two attribute stores per transition,
stamped with the server's coarse clock, which the sweep advances every tick of at most 1 s:
deadlines are exact to a tick). The sweep walks every connection once a tick (``overdue``) —
about 0.3 µs each, 3 ms a second for 10,000 connections — and shedding at the connection cap
takes victims in batches from one walk (``shed_victims``), so neither costs anything per request.
"""

from __future__ import annotations

import enum
import heapq
import re
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

MAX_URL_BYTES = 16 * 1024
MAX_HEADERS = 128
MAX_HEADER_BYTES = 64 * 1024     # names and values of one request (and, separately, of its trailers)
MAX_HEAD_WAIT_BYTES = 1 << 20    # bytes received while no request head completes (one endless header)
MAX_REQUEST_ID = 128             # a client's X-Request-Id longer than this (or not visible ASCII) is replaced
MAX_JSON_DEPTH = 128             # nesting of a request body: deeper bodies crash Python engines' parsers

_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID)


class Phase(enum.IntEnum):
    """Where a connection's reading side is; each phase but NONE has a deadline."""

    NONE = 0     # a request is being answered and nothing of the next one has arrived
    IDLE = 1     # keep-alive: waiting for the next request
    HEAD = 2     # a request head is being received (a fresh connection counts from accept)
    BODY = 3     # a request body is being received
    LINGER = 4   # rejected: the rest of the body is read and discarded, then the connection closes
    BLOCKED = 5  # (the writing side) the client has not taken our answer's bytes


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Bounds of the HTTP edge; each is a ``ctl gateway`` flag (see docs/security.md)."""

    max_body_bytes: int = 32 * 1024 * 1024
    body_budget_bytes: int = 256 * 1024 * 1024   # request-body bytes buffered at once, all connections
    max_connections: int = 0                     # 0: derived from RLIMIT_NOFILE (``derive_max_connections``)
    fd_reserve: int = 256                        # descriptors kept for etcd, logs and the listener
    head_timeout_s: float = 20.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    linger_s: float = 5.0                        # discarding a rejected body: at most this long
    max_json_depth: int = MAX_JSON_DEPTH
    max_url_bytes: int = MAX_URL_BYTES
    max_headers: int = MAX_HEADERS
    max_header_bytes: int = MAX_HEADER_BYTES     # of one request's headers (and, apart, of its trailers)
    max_upstream_head_bytes: int = 64 * 1024     # of an engine's response head (502 past it)

    @property
    def max_head_wait_bytes(self) -> int:
        """Bytes received while no request head completes (one endless header line)."""
        return max(MAX_HEAD_WAIT_BYTES, 2 * (self.max_url_bytes + self.max_header_bytes))

    def validate(self) -> None:
        """Raise ValueError naming the first bound that is not positive."""
        for name in ("max_body_bytes", "body_budget_bytes", "head_timeout_s", "body_timeout_s",
                     "write_timeout_s", "keepalive_timeout_s", "linger_s", "max_json_depth", "max_url_bytes",
                     "max_headers", "max_header_bytes", "max_upstream_head_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_connections < 0 or self.fd_reserve < 0:
            raise ValueError("max_connections and fd_reserve must be >= 0")

    def timeouts(self) -> dict[Phase, float]:
        """The deadline of each phase, in seconds."""
        return {Phase.IDLE: self.keepalive_timeout_s, Phase.HEAD: self.head_timeout_s,
                Phase.BODY: self.body_timeout_s, Phase.LINGER: self.linger_s,
                Phase.BLOCKED: self.write_timeout_s}


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (as nginx's worker_rlimit_nofile
    and Go's runtime do); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def derive_max_connections(nofile: int, reserve: int) -> int:
    """Client connections that fit in ``nofile`` descriptors, ``reserve`` kept aside.

    Every client connection with a request in flight holds one upstream connection too (HTTP/1.1
    to engines: one request per connection), so each may need two descriptors, as nginx counts
    ``worker_connections`` for a proxy.
    """
    return max(16, (nofile - reserve) // 2)


def valid_request_id(value: bytes) -> bool:
    """True for a client ``X-Request-Id`` the gateway may echo, forward and log."""
    return _REQUEST_ID.fullmatch(value) is not None


def json_depth_within(body: bytes, payload: object, limit: int) -> bool:
    """True when the parsed ``payload`` (of ``body``) nests at most ``limit`` containers deep.

    A body with no more brackets than ``limit`` cannot nest deeper: two byte counts in C decide
    almost every request without walking the parsed value.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    stack: list[tuple[object, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return True


C = TypeVar("C")

#: At the connection cap, who goes first: lingering (rejected) connections, then those still
#: sending a head (slowloris), then idle keep-alive ones. Connections with a request being
#: answered are never shed.
SHED_ORDER = {Phase.LINGER: 0, Phase.HEAD: 1, Phase.IDLE: 2}


def overdue(phase: Phase, since: float, now: float, timeouts: Mapping[Phase, float]) -> bool:
    """Whether a connection that entered ``phase`` at ``since`` is past its deadline at ``now``."""
    timeout = timeouts.get(phase)
    return timeout is not None and now - since >= timeout


def shed_victims(entries: Iterable[tuple[C, Phase, float]], count: int) -> list[C]:
    """Up to ``count`` connections to shed, in order: by SHED_ORDER, then the longest waiting."""
    ranked = [(SHED_ORDER[phase], since, i, conn) for i, (conn, phase, since) in enumerate(entries)
              if phase in SHED_ORDER]
    return [conn for *_, conn in heapq.nsmallest(count, ranked)]
