"""`ctl keys create | list | revoke`: API keys for the gateway.

A key is shown once, at creation; etcd keeps only ``keys/<sha256 hex>`` → ApiKey. Its public
name is ``key_id``, the first 8 hex characters of that hash: listings and `revoke` use it.

    create  ──► new_api_key() ──► txn(absent(keys/<hash>)) put ApiKey ──► print key once
    revoke  ──► list keys/, match id prefix ──► txn(mod_revision == read) put revoked=true
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any

import typer

from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    ExitCode,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    fail,
    open_store,
    run_async,
    warn,
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys, decode_all
from controlplane.pb import ApiKey
from controlplane.store import Cmp, EtcdConfig, KeyValue, Op
from gateway.auth import key_hash, new_api_key

KEY_ID_LEN = 8
UINT32_MAX = 2**32 - 1
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z, the last moment datetime can show
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

keys_app = typer.Typer(
    help="Create, list and revoke gateway API keys (etcd stores only their SHA-256 hash).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


# -- pure core ----------------------------------------------------------------------------------


class ExpiryError(ValueError):
    """An --expires value that is not a duration, a date or a future unix time."""


def parse_expiry(text: str, now: float) -> int:
    """Unix seconds at which a key expires; 0 = never.

    Accepts ``never``/``0``; a duration from ``now`` (``90m``, ``12h``, ``30d``, ``2w``); a date
    (``2026-12-31``, the start of that day in UTC) or ISO date-time (naive means UTC); or unix
    seconds. A moment not in the future is an error: such a key could never be used.
    """
    value = text.strip().lower()
    if value in ("never", "0"):
        return 0
    if m := _DURATION.match(value):
        seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
        if seconds <= 0:
            raise ExpiryError(f"--expires {text!r}: a duration must be greater than zero")
        at = int(now) + seconds
    else:
        at = int(value) if value.isdigit() else _parse_datetime(text.strip())
    if at > _MAX_UNIX:
        raise ExpiryError(f"--expires {text!r}: later than 9999-12-31")
    if at <= now:
        when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        raise ExpiryError(f"--expires {text!r}: {when} is not in the future")
    return at


def _parse_datetime(text: str) -> int:
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ExpiryError(
            f"--expires {text!r}: expected never, a duration (30d, 12h, 90m, 2w), a date (2026-12-31), "
            "an ISO date-time or unix seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def parse_models(text: str | None) -> list[str]:
    """``a, b,,c`` → ``[a, b, c]`` (order kept, duplicates dropped)."""
    if not text:
        return []
    out: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name and name not in out:
            out.append(name)
    return out


def key_status(record: ApiKey, now: float) -> str:
    """active, revoked or expired (revoked wins: it is the operator's explicit act)."""
    if record.revoked:
        return "revoked"
    if record.expires_unix and now >= record.expires_unix:
        return "expired"
    return "active"


def key_view(record: ApiKey, now: float) -> dict[str, Any]:
    """What listings show of a key: never the key, never the full hash."""
    return {
        "key_id": record.key_id,
        "owner": record.owner,
        "allowed_models": list(record.allowed_models),
        "requests_per_minute": record.requests_per_minute,
        "tokens_per_minute": record.tokens_per_minute,
        "expires_unix": record.expires_unix,
        "created_unix": record.created_unix,
        "status": key_status(record, now),
        "admin": record.admin,
        "description": record.description,
    }


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An ApiKey record with the etcd key and revision it was read at."""

    digest: str
    record: ApiKey
    kv: KeyValue


class KeyIdError(LookupError):
    """A key id matches no key (``ambiguous`` False) or several (True)."""

    def __init__(self, message: str, *, ambiguous: bool) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


def match_key_id(keys: Sequence[StoredKey], key_id: str) -> StoredKey:
    """The one key whose hash starts with ``key_id``; KeyIdError when none or several do."""
    wanted = key_id.strip().lower()
    hits = [k for k in keys if wanted and k.digest.startswith(wanted)]
    if not hits:
        raise KeyIdError(f"no API key with id {key_id!r}", ambiguous=False)
    if len(hits) > 1:
        which = ", ".join(f"{k.digest[:12]} (owner {k.record.owner})" for k in hits)
        raise KeyIdError(f"key id {key_id!r} is ambiguous; it matches {which}: give more characters",
                         ambiguous=True)
    return hits[0]


# -- etcd shell ---------------------------------------------------------------------------------


async def store_new_key(config: EtcdConfig,
                        record_for: Callable[[str], ApiKey]) -> tuple[str, ApiKey, list[str]] | None:
    """Generate a key and write its hash record if that hash is new, else None.

    Returns (key, record, allowed models not in the catalog): a key may name models before they
    are added, so those are a warning, not an error.
    """
    keys = Keys(config.prefix)
    store = await open_store(config)
    try:
        key = new_api_key()
        digest = key_hash(key)
        record = record_for(digest)
        ok, _ = await store.txn([Cmp.absent(keys.api_key(digest))],
                                [Op.put(keys.api_key(digest), record.SerializeToString())])
        missing = [m for m in record.allowed_models if ok and await store.get(keys.model(m)) is None]
    finally:
        await store.close()
    return (key, record, missing) if ok else None


async def read_keys(config: EtcdConfig) -> tuple[list[StoredKey], list[str]]:
    """Every ApiKey record, plus a warning per record that does not decode."""
    keys = Keys(config.prefix)
    store = await open_store(config)
    try:
        kvs, _ = await store.list_prefix(keys.api_keys)
    finally:
        await store.close()
    warnings: list[str] = []
    out = [StoredKey(kv.key.rsplit("/", 1)[-1], key, kv) for kv, key in decode_all(ApiKey, kvs, warnings)]
    return out, warnings


async def revoke_key(config: EtcdConfig, key_id: str) -> tuple[StoredKey, bool]:
    """Set revoked=true on the key ``key_id`` names; returns (key, whether it changed).

    Raises KeyIdError when the id matches no key or several; TxnConflict when the record changed
    between the read and the write.
    """
    found, _ = await read_keys(config)
    target = match_key_id(found, key_id)
    if target.record.revoked:
        return target, False
    updated = ApiKey()
    updated.CopyFrom(target.record)
    updated.revoked = True
    store = await open_store(config)
    try:
        await store.guarded_txn([Cmp.mod_revision(target.kv.key, target.kv.mod_revision)],
                                [Op.put(target.kv.key, updated.SerializeToString())],
                                f"revoke key {target.record.key_id}")
    finally:
        await store.close()
    return StoredKey(target.digest, updated, target.kv), True


# -- commands -----------------------------------------------------------------------------------


def _when(unix: int, never: str = "never") -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%MZ") if unix > 0 else never


def _limit(n: int) -> str:
    return str(n) if n else "-"


@keys_app.command(epilog="Example:  ctl keys create --owner alice --models llama-3.1-8b --rpm 60 --expires 30d")
def create(
    owner: Annotated[str, typer.Option("--owner", help="Who the key belongs to (shown in listings and usage).")],
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models it may use (default: all).")]
    = None,
    rpm: Annotated[int, typer.Option("--rpm", min=0, max=UINT32_MAX, help="Requests per minute; 0 = unlimited.")] = 0,
    tpm: Annotated[int, typer.Option("--tpm", min=0, max=UINT32_MAX, help="Tokens per minute; 0 = unlimited.")] = 0,
    expires: Annotated[str, typer.Option(
        "--expires", help="never, a duration (30d, 12h, 90m, 2w), a date (2026-12-31, UTC) or unix seconds.")]
    = "never",
    description: Annotated[str, typer.Option("--description", help="Free text shown in listings.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="May see private models and the usage of others.")] = False,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Create an API key. The key is printed once and cannot be shown again."""
    if not owner.strip():
        fail("--owner must not be empty", ExitCode.USAGE)
    now = time.time()
    try:
        expires_unix = parse_expiry(expires, now)
    except ExpiryError as exc:
        fail(str(exc), ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)

    def record_for(digest: str) -> ApiKey:
        return ApiKey(key_id=digest[:KEY_ID_LEN], owner=owner.strip(), allowed_models=parse_models(models),
                      requests_per_minute=rpm, tokens_per_minute=tpm, expires_unix=expires_unix,
                      created_unix=int(now), revoked=False, description=description, admin=admin)

    created = run_async(lambda: store_new_key(config, record_for))
    if created is None:  # 256 random bits colliding means a broken RNG: refuse rather than overwrite
        fail("a key with this hash already exists; nothing was written", ExitCode.CONFLICT)
    key, record, missing = created
    if missing:
        print(f"warning: not in the model catalog (yet): {', '.join(missing)}", file=sys.stderr)
    if output is OutputFormat.json:
        print_json({"key": key, **key_view(record, now)})
    else:
        print(f"key:      {key}")
        print(f"key id:   {record.key_id}")
        print(f"owner:    {record.owner}")
        print(f"models:   {','.join(record.allowed_models) or 'all'}")
        print(f"limits:   {_limit(record.requests_per_minute)} rpm, {_limit(record.tokens_per_minute)} tpm")
        print(f"expires:  {_when(record.expires_unix)}")
    print("warning: store this key now; it cannot be shown again (etcd keeps only its hash).", file=sys.stderr)


@keys_app.command(name="list",
                  epilog="Example:  ctl keys list   |   ctl keys list -o json | jq '.[] | select(.status==\"active\")'")
def list_keys(
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List API keys: id, owner, models, limits, expiry, creation and status (never the key)."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    found, warnings = run_async(lambda: read_keys(config))
    now = time.time()
    views = sorted((key_view(k.record, now) for k in found), key=lambda v: (v["owner"], v["created_unix"]))
    warn(warnings)
    if output is OutputFormat.json:
        print_json(views)
        return
    print_table(
        ["key id", "owner", "models", "rpm", "tpm", "expires", "created", "status"],
        [(v["key_id"], v["owner"] + (" (admin)" if v["admin"] else ""), ",".join(v["allowed_models"]) or "all",
          _limit(v["requests_per_minute"]), _limit(v["tokens_per_minute"]), _when(v["expires_unix"]),
          _when(v["created_unix"], "-"), v["status"]) for v in views],
        title=f"API keys ({len(views)})",
    )


@keys_app.command(epilog="Example:  ctl keys revoke 1a2b3c4d")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id from `ctl keys list` (a unique prefix is enough).")],
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Revoke an API key: gateways reject it as soon as they see the change."""
    wanted = key_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,64}", wanted):
        fail(f"key id {key_id!r} is not a hex id as `ctl keys list` shows it", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    try:
        target, changed = run_async(lambda: revoke_key(config, wanted))
    except KeyIdError as exc:
        fail(str(exc), ExitCode.USAGE if exc.ambiguous else ExitCode.NOT_FOUND)
    if output is OutputFormat.json:
        print_json({"key_id": target.record.key_id, "owner": target.record.owner, "revoked": True,
                    "changed": changed})
    elif changed:
        print(f"revoked key {target.record.key_id} (owner {target.record.owner})")
    else:
        print(f"key {target.record.key_id} (owner {target.record.owner}) was already revoked")
