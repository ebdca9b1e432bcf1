"""The planner's demand: per-model rates from every gateway's GatewayRecord (pure).

Gateways publish their demand inside their one ``gateways/<id>`` record (on their lease). Gateways
from before that wrote one ``demand/<model>/<gateway_id>`` record per model; readers still add
those in during an upgrade (a gateway writes one form or the other, never both).
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.keys import RecordDecodeError
from controlplane.keys import decode as decode_record
from controlplane.pb import Demand, GatewayRecord
from controlplane.store import KeyValue


def demand_of(gateways: Iterable[GatewayRecord], legacy: Iterable[Demand] = ()) -> list[Demand]:
    """One Demand per (gateway, model): the records' entries (gateway id filled in) and legacy ones."""
    out: list[Demand] = []
    for g in gateways:
        for d in g.demand:
            rec = Demand()
            rec.CopyFrom(d)
            rec.gateway_id = g.gateway_id
            if not rec.updated_unix_ms:
                rec.updated_unix_ms = g.updated_unix_ms
            out.append(rec)
    out.extend(legacy)
    return out


def decode_demand(gateway_kvs: Iterable[KeyValue], legacy_kvs: Iterable[KeyValue],
                  warnings: list[str]) -> list[Demand]:
    """``demand_of`` over raw key-values; one warning per record that does not decode."""
    gateways: list[GatewayRecord] = []
    legacy: list[Demand] = []
    for kv in gateway_kvs:
        try:
            gateways.append(decode_record(GatewayRecord, kv))
        except RecordDecodeError as exc:
            warnings.append(str(exc))
    for kv in legacy_kvs:
        try:
            legacy.append(decode_record(Demand, kv))
        except RecordDecodeError as exc:
            warnings.append(str(exc))
    return demand_of(gateways, legacy)
