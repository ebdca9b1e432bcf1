"""API keys: generated once, stored only as a SHA-256 hash, checked against a watched copy.

A key looks like ``mp-<43 url-safe chars>`` (256 bits). etcd holds ``keys/<sha256 hex>`` →
ApiKey (owner, allowed models, limits, expiry), never the key. The gateway hashes the presented
bearer token and looks the hash up in its in-memory table; comparing digests of a fixed length
built from a secret the caller does not control gives no useful timing signal, and the final
equality is checked with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import structlog

from controlplane.keys import decode_segment
from controlplane.pb import ApiKey, ModelSpec
from controlplane.store.cache import CacheEvent, Replaced
from gateway.errors import Forbidden, ModelNotFound, Unauthorized

log = structlog.get_logger(__name__)

KEY_PREFIX = "mp-"


def new_api_key() -> str:
    """A fresh random API key (shown to its owner once)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """The hex SHA-256 of a key: its name in etcd."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's public id and record (``anonymous`` when auth is off)."""

    key_id: str
    owner: str
    record: ApiKey | None

    def may_use(self, model: str) -> bool:
        """Per-model access: a key with allowed_models may use only those."""
        if self.record is None or self.record.admin or not self.record.allowed_models:
            return True
        return model in self.record.allowed_models


ANONYMOUS = Principal("anonymous", "anonymous", None)


class KeyTable:
    """Hash → ApiKey, kept current by the keys cache."""

    def __init__(self) -> None:
        self._by_hash: dict[str, tuple[str, ApiKey]] = {}   # digest -> (the digest as stored in etcd, record)
        self.loaded = False

    def apply(self, event: CacheEvent[ApiKey]) -> None:
        """Apply an event of the keys cache (undecodable records never reach it: unknown keys)."""
        if isinstance(event, Replaced):
            self._by_hash = {}
            for key, rec in event.items.items():
                self._put(key, rec)
            self.loaded = True
            return
        for key in (*event.deletes, *event.bad):
            self._by_hash.pop(key.rsplit("/", 1)[-1], None)
        for key, rec in event.upserts.items():
            self._put(key, rec)

    def _put(self, key: str, rec: ApiKey) -> None:
        digest = key.rsplit("/", 1)[-1]
        self._by_hash[digest] = (digest, rec)

    def __len__(self) -> int:
        return len(self._by_hash)

    def key_ids(self) -> set[str]:
        """Public ids of every key in the table."""
        return {r.key_id for _, r in self._by_hash.values()}

    def authenticate(self, authorization: str | None, now: float | None = None) -> Principal:
        """The caller behind an ``Authorization`` header; raises Unauthorized with the reason."""
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        digest = key_hash(token)
        entry = self._by_hash.get(digest)
        # The final check compares the digest stored in etcd with the presented key's, in constant time.
        if entry is None or not hmac.compare_digest(entry[0], digest):
            raise Unauthorized("invalid API key")
        record = entry[1]
        if record.revoked:
            raise Unauthorized("this API key was revoked")
        if record.expires_unix and (now if now is not None else time.time()) >= record.expires_unix:
            raise Unauthorized("this API key has expired")
        return Principal(record.key_id, record.owner, record)


class ModelAccessTable:
    """Private models (ModelSpec.access.public false) and who may see them, from the models cache.

    A model without a catalog record, or with a record written before access rules existed (no
    ``access`` field), is public.
    """

    def __init__(self) -> None:
        self._private: dict[str, frozenset[str]] = {}   # model -> allowed owners
        self._catalog: set[str] = set()
        self.loaded = False

    def apply(self, event: CacheEvent[ModelSpec]) -> None:
        """Apply an event of the models cache; a record that does not decode fails closed."""
        if isinstance(event, Replaced):
            self._private = {}
            self._catalog = set()
            for key in event.bad:
                self._put_bad(key)
            for key, spec in event.items.items():
                self._put(key, spec)
            self.loaded = True
            return
        for key in event.deletes:
            name = decode_segment(key.rsplit("/", 1)[-1])
            self._private.pop(name, None)
            self._catalog.discard(name)
        for key in event.bad:
            self._put_bad(key)
        for key, spec in event.upserts.items():
            self._put(key, spec)

    def _put_bad(self, key: str) -> None:
        # fail closed: a model whose access rules cannot be read is treated as private to nobody
        name = decode_segment(key.rsplit("/", 1)[-1])
        log.warning("undecodable model record; hiding it from non-admin keys", key=key)
        self._catalog.add(name)
        self._private[name] = frozenset()

    def _put(self, key: str, spec: ModelSpec) -> None:
        name = decode_segment(key.rsplit("/", 1)[-1])
        self._catalog.add(name)
        if spec.HasField("access") and not spec.access.public:
            self._private[name] = frozenset(spec.access.allowed_owners)
        else:
            self._private.pop(name, None)

    def visible(self, principal: Principal, model: str) -> bool:
        """True when ``principal`` may know that ``model`` exists."""
        owners = self._private.get(model)
        if owners is None or principal.record is None or principal.record.admin:
            return True
        return principal.owner in owners

    def in_catalog(self, model: str) -> bool:
        """True when ``model`` has a catalog record (it may have no instance yet)."""
        return model in self._catalog

    def is_private(self, model: str) -> bool:
        """True when ``model`` is private to some owners (or unreadable: private to admins)."""
        return model in self._private

    def private_models(self) -> list[str]:
        """Names of private models, sorted."""
        return sorted(self._private)


def model_not_found(model: str) -> ModelNotFound:
    """The one answer for a model that does not exist and for one the key may not know about."""
    return ModelNotFound(f"The model '{model}' does not exist or is not served right now.", param="model")


def check_model_access(principal: Principal, model: str, access: ModelAccessTable | None = None, *,
                       exists: bool = True) -> None:
    """Raise ModelNotFound (404) for a model that does not exist or that ``principal`` may not see,
    and Forbidden (403) for a visible model outside the key's allowed_models.

    The 404 is decided first and is the same for both cases (status, body, code path), so a key
    cannot tell a private model from a name that does not exist; only a model the key may see can
    earn a 403.
    """
    if not exists or (access is not None and not access.visible(principal, model)):
        raise model_not_found(model)
    if not principal.may_use(model):
        raise Forbidden(f"this API key may not use model '{model}'", param="model")
