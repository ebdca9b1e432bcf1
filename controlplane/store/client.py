"""EtcdStore: the one place modelpool talks to etcd.

A thin typed layer over the etcd3aio asyncio client (several endpoints with round-robin
failover, TLS/mTLS, retries of transient errors). Everything else in modelpool imports this
module, never etcd3aio, so the client library can be swapped by rewriting this package only.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import Compare, RequestOp
from etcd3aio.kv import KVService

from controlplane.store.config import EtcdConfig, parse_endpoint
from controlplane.store.errors import LeaseLost, StoreAuthError, StoreError, StoreUnavailable, TxnConflict

log = structlog.get_logger(__name__)

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd returned it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """What one etcd member says about itself and the cluster's alarms (Maintenance.Status / Alarm)."""

    endpoint: str
    version: str
    db_size_bytes: int              # the backend file, free pages included (what the quota counts)
    db_size_in_use_bytes: int       # after compaction; the rest is reclaimed by defragmentation
    leader: int
    raft_index: int
    alarms: tuple[str, ...] = ()    # e.g. ("NOSPACE",): the cluster refuses writes


@dataclass(frozen=True, slots=True)
class Cmp:
    """A transaction guard. Build with the ``Cmp.*`` constructors."""

    pb: Compare

    @staticmethod
    def mod_revision(key: str, revision: int, op: str = "==", *, prefix: bool = False) -> Cmp:
        """Guard on the key's (or every key under a prefix's) last-modified revision."""
        c = Compare(result=_OPS[op], target=Compare.MOD, key=key.encode(), mod_revision=revision)
        if prefix:
            c.range_end = prefix_range_end(key)
        return Cmp(c)

    @staticmethod
    def create_revision(key: str, revision: int, op: str = "==") -> Cmp:
        """Guard on the key's create revision (0 means the key does not exist)."""
        return Cmp(Compare(result=_OPS[op], target=Compare.CREATE, key=key.encode(), create_revision=revision))

    @staticmethod
    def value(key: str, value: bytes, op: str = "==") -> Cmp:
        """Guard on the key's value."""
        return Cmp(Compare(result=_OPS[op], target=Compare.VALUE, key=key.encode(), value=value))

    @staticmethod
    def absent(key: str) -> Cmp:
        """The key does not exist."""
        return Cmp.create_revision(key, 0)


_OPS = {"==": Compare.EQUAL, "!=": Compare.NOT_EQUAL, "<": Compare.LESS, ">": Compare.GREATER}


@dataclass(frozen=True, slots=True)
class Op:
    """A transaction operation. Build with ``Op.put`` / ``Op.delete``."""

    pb: RequestOp

    @staticmethod
    def put(key: str, value: bytes, lease: int = 0) -> Op:
        """Write ``value`` at ``key`` (attached to ``lease`` when non-zero)."""
        return Op(KVService.txn_op_put(key, value, lease=lease))

    @staticmethod
    def delete(key: str, *, prefix: bool = False) -> Op:
        """Delete ``key``, or every key under it when ``prefix``."""
        return Op(KVService.txn_op_delete(key, range_end=prefix_range_end(key) if prefix else None))


def _resolve(host: str, port: int) -> list[str]:
    """gRPC's ipv4: target takes addresses only; resolve names here so hostnames work too."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StoreUnavailable(f"cannot resolve etcd host {host!r}: {exc.strerror}") from exc
    return sorted({f"{info[4][0]}:{port}" for info in infos})


#: etcd's answers (INVALID_ARGUMENT or UNAUTHENTICATED) that are about credentials, not the request.
_AUTH_ERRORS = ("user name is empty", "authentication failed", "authentication is not enabled",
                "invalid auth token", "revision of auth store is old", "permission denied")


def _translate(exc: BaseException, what: str) -> StoreError:
    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    if "lease not found" in (detail or ""):
        return LeaseLost(f"{what}: the lease expired or was revoked")
    if isinstance(exc, EtcdUnauthenticatedError | EtcdPermissionDeniedError) or any(
            marker in (detail or "") for marker in _AUTH_ERRORS):
        return StoreAuthError(f"{what}: {detail or exc}")
    if isinstance(exc, EtcdConnectionError | EtcdTransientError | TimeoutError):
        return StoreUnavailable(f"{what}: etcd unreachable ({str(exc) or 'timeout'})")
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return StoreUnavailable(f"{what}: etcd unreachable ({code.name})")
        return StoreError(f"{what}: {code.name}: {exc.details()}")
    return StoreError(f"{what}: {exc}")


class EtcdStore:
    """Async key-value access to etcd with revisions, prefixes, transactions and leases.

    With a user and password it authenticates on connect and again whenever etcd says the token
    is no longer good (``invalid auth token``: etcd's simple tokens expire after
    ``--auth-token-ttl`` seconds idle, 300 by default, and are per member; ``revision of auth
    store is old``: a JWT issued before a user or role changed). Every call here retries once
    after re-authenticating, so callers never see token expiry. Watch streams and lease
    keepalives already open keep working after the token expires (etcd checks a watch's
    permission when it is created, and keepalives carry no permission check); a watch that etcd
    refuses to create is relisted by its owner, and that list re-authenticates.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self._client: Etcd3Client | None = None
        self._auth_lock = asyncio.Lock()
        self._token_generation = 0
        self.authentications = 0

    @property
    def client(self) -> Etcd3Client:
        """The underlying etcd3aio client (for this package's own modules only)."""
        if self._client is None:
            raise StoreError("store is not connected: call connect() first")
        return self._client

    @property
    def authenticated(self) -> bool:
        """True when this store sends credentials (a user and password are configured)."""
        return self.config.user is not None and self.config.password is not None

    async def connect(self) -> EtcdStore:
        """Open the channel (lazy in gRPC: a down etcd shows up on the first call, not here)."""
        addresses: list[str] = []
        for ep in self.config.endpoints:
            host, port, _ = parse_endpoint(ep)
            addresses.extend(_resolve(host, port))
        conn_args: dict[str, Any] = dict(self.config.read_tls_material())
        self._client = Etcd3Client(
            addresses,
            rpc_max_attempts=3,
            watch_reconnect_backoff_seconds=0.1,
            watch_max_reconnect_backoff_seconds=2.0,
            tls_server_name=self.config.tls_server_name if self.config.tls else None,
            **conn_args,
        )
        _fast_reconnect(self._client)
        await self._client.connect()
        if self.authenticated:
            try:
                await self._authenticate(self._token_generation)
            except BaseException:
                await self.close()
                raise
        return self

    async def _authenticate(self, seen_generation: int) -> None:
        """Get a fresh token, unless another call already did since ``seen_generation``."""
        async with self._auth_lock:
            if self._token_generation != seen_generation:
                return
            client = self.client
            auth = client.auth
            assert auth is not None  # set by connect()
            # etcd rejects an Authenticate that carries an expired token: ask without one.
            auth.set_token(None)
            try:
                resp = await auth.authenticate(self.config.user or "", self.config.password or "",
                                               timeout=self.config.timeout_s)
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
                if _detail(exc).endswith("authentication is not enabled"):
                    # Credentials handed out before `ctl auth enable`: work without a token now;
                    # once auth is on, etcd's "user name is empty" makes us authenticate.
                    client.set_token(None)
                    self._token_generation += 1
                    log.info("etcd authentication is not enabled; sending no token", user=self.config.user)
                    return
                auth.set_token(client._token)  # keep sending what the other services send
                raise _translate(exc, f"etcd authentication as {self.config.user!r}") from exc
            client.set_token(resp.token)
            self._token_generation += 1
            self.authentications += 1
            if self._token_generation > 1:
                log.info("etcd token renewed", user=self.config.user, authentications=self.authentications)

    async def _call(self, what: str, fn: Callable[[], Awaitable[R]]) -> R:
        """Run one etcd call; re-authenticate and retry once when etcd says the token is stale."""
        generation = self._token_generation
        try:
            return await fn()
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            if not (self.authenticated and token_problem(exc)):
                raise _translate(exc, what) from exc
        await self._authenticate(generation)
        try:
            return await fn()
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _translate(exc, what) from exc

    async def close(self) -> None:
        """Close the channel. Leases are not revoked here (LeaseSession.close does that)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> EtcdStore:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys -------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """Join ``parts`` under the configured prefix: key("instances", "m") -> /modelpool/instances/m.

        A trailing empty part gives a prefix ending in '/': key("instances", "") -> /modelpool/instances/.
        """
        for i, p in enumerate(parts):
            if "/" in p or (not p and i != len(parts) - 1):
                raise StoreError(f"bad key part {p!r}: must be non-empty and contain no '/'")
        return "/".join((self.prefix, *parts))

    # -- reads ------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """Read one key; None when it does not exist."""
        resp = await self._call(f"get {key}", lambda: self.client.kv.get(  # type: ignore[union-attr]
            key, timeout=self.config.timeout_s))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def list_prefix(self, prefix: str, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted) and the store revision the read was served at."""
        if not prefix.endswith("/"):
            prefix += "/"
        resp = await self._call(f"list {prefix}", lambda: self.client.kv.get(  # type: ignore[union-attr]
            prefix, range_end=prefix_range_end(prefix), revision=revision, timeout=self.config.timeout_s))
        return [_kv(kv) for kv in resp.kvs], int(resp.header.revision)

    async def revision(self) -> int:
        """The current store revision."""
        resp = await self._call("read revision", lambda: self.client.kv.get(  # type: ignore[union-attr]
            self.prefix + "/", count_only=True, timeout=self.config.timeout_s))
        return int(resp.header.revision)

    # -- writes -----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write one key; returns the revision of the write."""
        resp = await self._call(f"put {key}", lambda: self.client.kv.put(  # type: ignore[union-attr]
            key, value, lease=lease, timeout=self.config.timeout_s))
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete one key (or a whole prefix); returns how many keys were deleted."""
        resp = await self._call(f"delete {key}", lambda: self.client.kv.delete(  # type: ignore[union-attr]
            key, range_end=prefix_range_end(key) if prefix else None, timeout=self.config.timeout_s))
        return int(resp.deleted)

    async def txn(self, compares: Sequence[Cmp], success: Sequence[Op], failure: Sequence[Op] = ()) -> tuple[bool, int]:
        """Run one atomic transaction; returns (whether the compares held, revision)."""
        resp = await self._call("transaction", lambda: self.client.kv.txn(  # type: ignore[union-attr]
            [c.pb for c in compares], [o.pb for o in success], [o.pb for o in failure],
            timeout=self.config.timeout_s))
        return bool(resp.succeeded), int(resp.header.revision)

    async def guarded_txn(self, compares: Sequence[Cmp], success: Sequence[Op], what: str) -> int:
        """Run a transaction that must succeed; raises TxnConflict naming ``what`` otherwise."""
        ok, rev = await self.txn(compares, success)
        if not ok:
            raise TxnConflict(f"{what}: the state changed since it was read (revision now {rev})")
        return rev

    async def compact(self, revision: int) -> None:
        """Compact history up to ``revision`` (tests use this to force watch resyncs)."""
        await self._call("compact", lambda: self.client.kv.compact(  # type: ignore[union-attr]
            revision, physical=True, timeout=self.config.timeout_s))

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> tuple[int, int]:
        """Grant a lease of ``ttl`` seconds; returns (lease id, granted TTL)."""
        resp = await self._call("grant lease", lambda: self.client.lease.grant(  # type: ignore[union-attr]
            ttl, timeout=self.config.timeout_s))
        return int(resp.ID), int(resp.TTL)

    async def revoke_lease(self, lease_id: int, *, timeout: float = 2.0) -> None:
        """Revoke a lease: every key attached to it is deleted."""
        await self._call(f"revoke lease {lease_id:x}", lambda: self.client.lease.revoke(  # type: ignore[union-attr]
            lease_id, timeout=timeout, max_attempts=1))

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew a lease once; returns its new TTL (0 or less: the lease is gone)."""
        async def once() -> int:
            call = self.client.lease.keep_alive(lease_id)  # type: ignore[union-attr]
            try:
                resp = await call.read()
            finally:
                call.cancel()
            if resp is grpc.aio.EOF:
                raise StoreError("keepalive stream closed without an answer")
            return int(resp.TTL)
        return await self._call(f"keepalive lease {lease_id:x}", once)

    async def member_status(self, timeout: float = 2.0) -> MemberStatus:
        """Database size, version and alarms of the member this client talks to."""
        try:
            st = await self.client.maintenance.status(timeout=timeout, max_attempts=1)  # type: ignore[union-attr]
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _translate(exc, "status") from exc
        names = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT"}
        try:
            resp = await self.client.maintenance.alarms(timeout=timeout, max_attempts=1)  # type: ignore[union-attr]
            alarms = tuple(sorted({names.get(int(a.alarm), str(int(a.alarm))) for a in resp.alarms if int(a.alarm)}))
        except (EtcdUnauthenticatedError, EtcdPermissionDeniedError):
            alarms = ()    # listing alarms may need etcd's root role; the size alone still warns
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _translate(exc, "alarms") from exc
        return MemberStatus(
            endpoint=",".join(self.config.endpoints), version=str(st.version), db_size_bytes=int(st.dbSize),
            db_size_in_use_bytes=int(getattr(st, "dbSizeInUse", 0)) or int(st.dbSize), leader=int(st.leader),
            raft_index=int(st.raftIndex), alarms=alarms)

    async def probe(self, timeout: float = 2.0) -> int:
        """A linearizable read that must answer within ``timeout`` (the whole call, retries
        included); returns the store revision. StoreUnavailable when etcd does not answer in time:
        a hung etcd (stopped, partitioned, without quorum) shows here within ``timeout``, while a
        gRPC stream on it may stay silent for minutes."""
        try:
            resp = await asyncio.wait_for(self._call("probe", lambda: self.client.kv.get(  # type: ignore[union-attr]
                self.prefix + "/", count_only=True, timeout=timeout)), timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"etcd did not answer a read within {timeout}s") from exc
        return int(resp.header.revision)

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when etcd answers a read within ``timeout``."""
        try:
            await asyncio.wait_for(self._call("ping", lambda: self.client.kv.get(  # type: ignore[union-attr]
                self.prefix + "/", count_only=True, serializable=True, timeout=timeout, max_attempts=1)), timeout)
        except (TimeoutError, StoreError):
            return False
        return True


#: What etcd says when a token is no longer good (re-authenticate and retry), as opposed to a
#: missing permission (``permission denied``), which no retry fixes. ``user name is empty``: auth
#: was switched on while we held no token.
TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")


def _detail(exc: BaseException) -> str:
    """etcd's message behind ``exc`` (the gRPC details of the error that caused it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen.details() or ""
        seen = seen.__cause__
    return str(exc)


def token_problem(exc: BaseException) -> bool:
    """True when ``exc`` (or the gRPC error behind it) says the token expired or is stale."""
    seen: BaseException | None = exc
    while seen is not None:
        detail = seen.details() if isinstance(seen, grpc.aio.AioRpcError) else str(seen)
        if any(marker in (detail or "") for marker in TOKEN_ERRORS):
            return True
        seen = seen.__cause__
    return False


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


# gRPC's default reconnect backoff grows to 120 s, so a client that saw etcd go away may take
# seconds to notice it is back. Agents must re-register within about a second of etcd returning.
# (Not grpc.min_reconnect_backoff_ms: gRPC uses it as the minimum connect timeout, and a low one
# aborts TLS handshakes on a busy machine.)
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _fast_reconnect(client: Etcd3Client) -> None:
    """Add RECONNECT_OPTIONS to the client's channel options (etcd3aio has no parameter for them)."""
    manager = getattr(client, "_manager", None)
    options = getattr(manager, "grpc_options", None)
    if isinstance(options, list):
        options.extend(RECONNECT_OPTIONS)
    else:  # a newer etcd3aio changed its internals: keep working, just reconnect more slowly
        log.warning("cannot set gRPC reconnect backoff on this etcd3aio version")
