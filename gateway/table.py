"""The routing table: derived state, rebuilt from etcd's instance records at will.

``RoutingTable.apply`` takes the instances cache's events (``controlplane/store/cache.py``: a
Replaced replaces everything, a Delta patches it). Only READY instances are routable; DRAINING,
STARTING and FAILED ones are kept (so ``/v1/models`` and metrics can tell) but never offered.
Records without an endpoint or a model are logged and skipped, never fatal (undecodable ones
never get here: the cache leaves them out).

Two memories keep a brief etcd outage from looking like a dead pool (``hold_removals``):

* **recently known models**: a model whose last instance went away stays *known* for
  ``remember_s`` (bounded to ``max_remembered`` models), so a client gets 503 "no ready
  instance, retry", never 404 "does not exist", while the pool is re-registering;
* **lingering endpoints**: while etcd is unreachable, and for ``grace_s`` after it answers
  again, READY instances that vanish from etcd stay usable as a last resort (only when a model
  has no READY instance at all). A hung etcd that resumes after more than a lease TTL expires
  every agent's lease at once; the engines behind those leases are still serving, and their
  agents re-register within about a third of a TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store.cache import CacheEvent, Replaced

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

    def __init__(self, *, remember_s: float = 600.0, max_remembered: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_key: dict[str, Endpoint] = {}
        self._ready: dict[str, tuple[Endpoint, ...]] = {}
        self._models: frozenset[str] = frozenset()
        self.revision = 0
        self.loaded = False
        self.remember_s = remember_s
        self.max_remembered = max_remembered
        self._clock = clock
        self._gone: OrderedDict[str, float] = OrderedDict()      # model -> when its last instance went
        self._hold_until = 0.0                                   # lingering allowed until (monotonic)
        self._lingering: dict[str, Endpoint] = {}                # key -> READY endpoint gone from etcd
        self._lingering_ready: dict[str, tuple[Endpoint, ...]] = {}

    def apply(self, event: CacheEvent[InstanceRecord]) -> None:
        """Apply an event of the instances cache (Replaced: replace all; Delta: patch)."""
        before = self._by_key
        if isinstance(event, Replaced):
            self._by_key = {}
            for key, rec in event.items.items():
                self._put(key, rec)
            self.loaded = True
        else:
            self._by_key = dict(before)
            for key in (*event.deletes, *event.bad):
                self._by_key.pop(key, None)
            for key, rec in event.upserts.items():
                self._put(key, rec)
        self.revision = event.revision
        self._note_removals(before)
        self._rebuild()

    def _put(self, key: str, rec: InstanceRecord) -> None:
        if not rec.endpoint or not rec.model:
            log.warning("skipping instance record without endpoint or model", key=key)
            self._by_key.pop(key, None)
            return
        self._by_key[key] = Endpoint.from_record(rec)

    # -- outage memories ---------------------------------------------------------------------

    def hold_removals(self, until: float) -> None:
        """Keep READY instances that vanish from etcd as last-resort endpoints until ``until``
        (monotonic; ``float('inf')`` while etcd is unreachable)."""
        self._hold_until = until
        if until <= self._clock():
            self._drop_lingering()

    def _note_removals(self, before: dict[str, Endpoint]) -> None:
        now = self._clock()
        holding = now < self._hold_until
        for key, ep in before.items():
            if key in self._by_key:
                continue
            if holding and ep.ready:
                self._lingering[key] = ep
        for key in [k for k in self._lingering if k in self._by_key]:  # re-registered: the real one wins
            del self._lingering[key]
        if not holding:
            self._lingering.clear()

    def _drop_lingering(self) -> None:
        if self._lingering:
            log.info("outage grace over; forgetting instances that did not come back", instances=len(self._lingering))
        self._lingering.clear()
        self._lingering_ready = {}

    def _rebuild(self) -> None:
        ready: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in self._by_key.values():
            if ep.ready:
                ready[ep.model].append(ep)
        self._ready = {m: tuple(sorted(eps, key=lambda e: e.instance_id)) for m, eps in ready.items()}
        lingering: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in self._lingering.values():
            lingering[ep.model].append(ep)
        self._lingering_ready = {m: tuple(sorted(eps, key=lambda e: e.instance_id)) for m, eps in lingering.items()}
        models = frozenset(ep.model for ep in self._by_key.values())
        now = self._clock()
        for gone in self._models - models:
            self._gone[gone] = now
            self._gone.move_to_end(gone)
        for back in models & self._gone.keys():
            del self._gone[back]
        while self._gone and (len(self._gone) > self.max_remembered
                              or now - next(iter(self._gone.values())) > self.remember_s):
            self._gone.popitem(last=False)
        self._models = models

    # -- reading -----------------------------------------------------------------------------

    def ready(self, model: str) -> tuple[Endpoint, ...]:
        """READY instances of ``model``; when it has none, instances kept through an etcd outage."""
        eps = self._ready.get(model)
        if eps:
            return eps
        if self._lingering_ready and model in self._lingering_ready:
            if self._clock() < self._hold_until:
                return self._lingering_ready[model]
            self._drop_lingering()
        return ()

    def models(self) -> list[str]:
        """Models with at least one READY instance, sorted."""
        return sorted(self._ready)

    def known(self, model: str) -> bool:
        """True when any instance of ``model`` exists, routable or not, or existed recently
        (``remember_s``): a model that is briefly without instances is unavailable, not unknown."""
        if model in self._models:
            return True
        gone_at = self._gone.get(model)
        return gone_at is not None and self._clock() - gone_at <= self.remember_s

    def all(self) -> list[Endpoint]:
        """Every instance, routable or not."""
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)
