"""The routing table: derived state, rebuilt from etcd's instance records at will.

``RoutingTable.apply`` takes what ``watch_prefix`` yields (a Resync replaces everything, Changes
patch it). Only READY instances are routable; DRAINING, STARTING and FAILED ones are kept (so
``/v1/models`` and metrics can tell) but never offered. Records that do not decode are logged
and skipped, never fatal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import structlog

from controlplane.keys import RecordDecodeError, decode
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store import Changes, KeyValue, Resync, WatchUpdate

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance as the router sees it."""

    instance_id: str
    model: str
    url: str                 # base URL without trailing slash
    state: int
    weight: float            # relative capacity (>0)
    max_concurrency: int     # 0 = unknown
    node_id: str
    gpu_type: str
    owner: str
    max_model_len: int = 0   # the engine's own /v1/models facts (0 / "" = not reported)
    root: str = ""
    parent: str = ""

    @property
    def ready(self) -> bool:
        """Routable: READY (not STARTING, DRAINING or FAILED)."""
        return self.state == InstanceState.READY

    @classmethod
    def from_record(cls, rec: InstanceRecord) -> Endpoint:
        """The routing view of an InstanceRecord."""
        return cls(
            instance_id=rec.instance_id, model=rec.model, url=rec.endpoint.rstrip("/"), state=rec.state,
            weight=rec.capacity_weight if rec.capacity_weight > 0 else 1.0, max_concurrency=rec.max_concurrency,
            node_id=rec.node_id, gpu_type=rec.gpu_type, owner=rec.owner, max_model_len=rec.max_model_len,
            root=rec.model_root, parent=rec.model_parent,
        )


def engine_card_fields(ready: tuple[Endpoint, ...]) -> dict[str, object]:
    """vLLM's model-card fields for /v1/models from the instances' records: ``max_model_len`` is
    the smallest any READY instance reported (a request that fits it fits wherever it is routed),
    ``root``/``parent`` the first reported (instance id order). Keys are left out when no instance
    reported them (engines other than vLLM), as a direct engine would not send them either."""
    out: dict[str, object] = {}
    lengths = [ep.max_model_len for ep in ready if ep.max_model_len > 0]
    if lengths:
        out["max_model_len"] = min(lengths)
    root = next((ep.root for ep in ready if ep.root), "")
    if root:
        out["root"] = root
        out["parent"] = next((ep.parent for ep in ready if ep.parent), None)
    return out


class RoutingTable:
    """Instances by model; READY ones in a tuple per model for fast picks."""

    def __init__(self) -> None:
        self._by_key: dict[str, Endpoint] = {}
        self._ready: dict[str, tuple[Endpoint, ...]] = {}
        self.revision = 0
        self.loaded = False

    def apply(self, update: WatchUpdate) -> None:
        """Apply a Resync (replace all) or Changes (patch) from the instances watch."""
        if isinstance(update, Resync):
            self._by_key = {}
            for key, kv in update.items.items():
                self._put(key, kv)
            self.loaded = True
        elif isinstance(update, Changes):
            for change in update.changes:
                if change.kv is None:
                    self._by_key.pop(change.key, None)
                else:
                    self._put(change.key, change.kv)
        self.revision = update.revision
        self._rebuild()

    def _put(self, key: str, kv: KeyValue) -> None:
        try:
            rec = decode(InstanceRecord, kv)
        except RecordDecodeError as exc:
            log.warning("skipping undecodable instance record", key=key, error=str(exc))
            self._by_key.pop(key, None)
            return
        if not rec.endpoint or not rec.model:
            log.warning("skipping instance record without endpoint or model", key=key)
            self._by_key.pop(key, None)
            return
        self._by_key[key] = Endpoint.from_record(rec)

    def _rebuild(self) -> None:
        ready: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in self._by_key.values():
            if ep.ready:
                ready[ep.model].append(ep)
        self._ready = {m: tuple(sorted(eps, key=lambda e: e.instance_id)) for m, eps in ready.items()}

    def ready(self, model: str) -> tuple[Endpoint, ...]:
        """READY instances of ``model`` (empty when none)."""
        return self._ready.get(model, ())

    def models(self) -> list[str]:
        """Models with at least one READY instance, sorted."""
        return sorted(self._ready)

    def known(self, model: str) -> bool:
        """True when any instance of ``model`` exists, routable or not."""
        return any(ep.model == model for ep in self._by_key.values())

    def all(self) -> list[Endpoint]:
        """Every instance, routable or not."""
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)
