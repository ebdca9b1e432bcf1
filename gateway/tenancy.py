"""Who may serve each model, as the gateway sees it: the catalog's ``servers``, kept current.

    models/ cache ──▶ ServePolicy.apply ──▶ servers(model) ──▶ RoutingTable (refuses the rest)
    tenants/ cache (instance keys only) ──┐
    instances/ cache (legacy layout) ─────┴──▶ RoutingTable.apply(event, scope)

The rules are controlplane/tenancy.py's: a model without ``servers`` (or without a catalog
record) is community-served (any tenant); a catalog record that does not decode is served by
nobody until it is fixed (fail closed, as private models are hidden).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from controlplane.keys import Keys, decode_segment
from controlplane.pb import InstanceRecord, ModelSpec
from controlplane.store import EtcdStore
from controlplane.store.cache import CacheEvent, Replaced, WatchedCache, proto_decoder
from controlplane.tenancy import Servers, parse_pool_key, servers_of
from gateway.table import Endpoint

InstancesHandler = Callable[[CacheEvent[InstanceRecord], str], None]


class ServePolicy:
    """model -> tenants that may serve it, for restricted models only (the rest: any tenant)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._servers: dict[str, frozenset[str]] = {}
        self.on_change = on_change

    def apply(self, event: CacheEvent[ModelSpec]) -> None:
        """Apply an event of the models cache, then tell the routing table to re-filter."""
        if isinstance(event, Replaced):
            self._servers = {}
            for key in event.bad:
                self._put(key, None)
            for key, spec in event.items.items():
                self._put(key, spec)
        else:
            for key in event.deletes:
                self._servers.pop(_model_of(key), None)
            for key in event.bad:
                self._put(key, None)
            for key, spec in event.upserts.items():
                self._put(key, spec)
        self.on_change()

    def _put(self, key: str, spec: ModelSpec | None) -> None:
        name = _model_of(key)
        if spec is None:  # undecodable: nobody may serve it (the empty set), until it is fixed
            self._servers[name] = frozenset()
            return
        servers = servers_of(spec)
        if servers is None:
            self._servers.pop(name, None)
        else:
            self._servers[name] = servers

    def servers(self, model: str) -> Servers:
        """Tenants that may serve ``model``; None when any tenant may (community-served)."""
        return self._servers.get(model)


def instance_caches(store: EtcdStore, keys: Keys, handler: InstancesHandler) -> list[WatchedCache[InstanceRecord]]:
    """The two caches instances come from: every tenant's (``tenants/``, instance keys only; the
    tenant is parsed from each key) and the legacy layout's (``instances/``)."""

    def is_instance(key: str) -> bool:
        parsed = parse_pool_key(keys.prefix, key)
        return parsed is not None and parsed.kind == "instance"

    decode = proto_decoder(InstanceRecord)
    return [
        WatchedCache(store, keys.tenants, decode, name="watch-instances", accept=is_instance,
                     handlers=(lambda event: handler(event, keys.tenants),)),
        WatchedCache(store, keys.instances, decode, name="watch-legacy-instances",
                     handlers=(lambda event: handler(event, keys.instances),)),
    ]


def model_card(model: str, ready: Sequence[Endpoint], servers: Servers, created: int) -> dict[str, object]:
    """``/v1/models`` entry: who serves it (tenants, from key paths) and whether it is community-served
    (any tenant may serve it, so a request may reach any pool member's engine)."""
    tenants = sorted({ep.tenant for ep in ready})
    return {
        "id": model, "object": "model", "created": created,
        "owned_by": tenants[0] if tenants else "modelpool",
        "instances": len(ready), "gpu_types": sorted({ep.gpu_type for ep in ready if ep.gpu_type}),
        "community_served": servers is None, "served_by": tenants,
    }


def _model_of(key: str) -> str:
    return decode_segment(key.rsplit("/", 1)[-1])
