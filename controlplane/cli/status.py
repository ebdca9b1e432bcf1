"""`ctl status`: what the pool looks like right now (nodes, instances, models, gateways, etcd space).

Nodes and instances come from both key layouts, each with the tenant its key names; an instance
whose tenant may not serve its model (``ModelSpec.servers``) is shown as refused, with the
reason, exactly as gateways refuse it (controlplane/tenancy.py decides for both).
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from controlplane.accounting.demand import decode_demand
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    EtcdQuotaOpt,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    etcd_quota,
    open_store,
    run_async,
)
from controlplane.cli.main import app
from controlplane.cli.output import age, print_json, print_table
from controlplane.etcdspace import human, space_warning
from controlplane.keys import Keys, decode_all, decode_segment
from controlplane.pb import GatewayRecord, InstanceState, ModelSpec
from controlplane.poolstate import read_pool
from controlplane.store import EtcdConfig, StoreError
from controlplane.store.errors import StoreUnavailable
from controlplane.tenancy import Servers, refusal_reason, servers_of


async def read_status(config: EtcdConfig, quota_bytes: int) -> dict[str, Any]:
    """Read nodes, instances, the model catalog and gateways at one revision, and etcd's space."""
    store = await open_store(config)
    keys = Keys(config.prefix)
    try:
        pool = await read_pool(store, keys)
        rev = pool.revision
        model_kvs, _ = await store.list_prefix(keys.models, revision=rev)
        gateway_kvs, _ = await store.list_prefix(keys.gateways, revision=rev)
        demand_kvs, _ = await store.list_prefix(keys.demand, revision=rev)
        etcd = await _etcd_space(store, quota_bytes)
    finally:
        await store.close()
    errors: list[str] = list(pool.warnings)
    spec_kvs = decode_all(ModelSpec, model_kvs, errors)
    specs = [m for _, m in spec_kvs]
    servers: dict[str, Servers] = {decode_segment(kv.key.rsplit("/", 1)[-1]): servers_of(m) for kv, m in spec_kvs}
    for bad in {kv.key for kv in model_kvs} - {kv.key for kv, _ in spec_kvs}:
        servers[decode_segment(bad.rsplit("/", 1)[-1])] = frozenset()  # unreadable: nobody (as gateways)
    gateways = [g for _, g in decode_all(GatewayRecord, gateway_kvs, [])]   # decode_demand warns once
    demand = decode_demand(gateway_kvs, demand_kvs, errors)
    models: dict[str, dict[str, Any]] = {}

    def model_row(name: str) -> dict[str, Any]:
        return models.setdefault(name, {"model": name, "ready": 0, "instances": 0, "refused": 0, "in_catalog": False,
                                        "min_replicas": 0, "servers": [], "community_served": True,
                                        "requests_per_second": 0.0, "in_flight": 0})

    for spec in specs:
        model_row(spec.name).update(in_catalog=True, min_replicas=spec.min_replicas, servers=sorted(spec.servers),
                                    community_served=not spec.servers)
    instances: list[dict[str, Any]] = []
    for entry in pool.instances:
        inst = entry.record
        why = refusal_reason(servers.get(entry.model), entry.tenant, entry.model)
        m = model_row(entry.model)
        m["instances"] += 1
        m["ready"] += inst.state == InstanceState.READY and not why
        m["refused"] += bool(why)
        instances.append({**_dict(inst), "tenant": entry.tenant, "node_ref": entry.node_ref,
                          "routable": inst.state == InstanceState.READY and not why, "refused": why})
    for d in demand:  # summed over the gateways that publish it
        m = model_row(d.model)
        m["requests_per_second"] = round(m["requests_per_second"] + d.requests_per_second, 3)
        m["in_flight"] += d.in_flight
    return {
        "revision": rev,
        "nodes": [{**_dict(n.record), "tenant": n.tenant, "node_ref": n.ref} for n in pool.nodes],
        "instances": instances,
        "models": sorted(models.values(), key=lambda m: m["model"]),
        "gateways": sorted((_gateway(g) for g in gateways), key=lambda g: g["gateway_id"]),
        "etcd": etcd,
        "errors": errors,
    }


def _gateway(g: GatewayRecord) -> dict[str, Any]:
    """A gateway row without its (bulky) per-key load: how many keys it reports is enough here."""
    d = _dict(g)
    d["limited_keys"] = len(d.pop("keys", []))
    return d


async def _etcd_space(store: Any, quota_bytes: int) -> dict[str, Any]:
    """The member's database size against the quota, with a warning near it (never fatal)."""
    try:
        st = await store.member_status()
    except StoreUnavailable:
        raise
    except StoreError as exc:   # e.g. an etcd user without maintenance permission
        return {"error": str(exc), "quota_bytes": quota_bytes, "warning": None}
    return {"endpoint": st.endpoint, "version": st.version, "db_size_bytes": st.db_size_bytes,
            "db_size_in_use_bytes": st.db_size_in_use_bytes, "quota_bytes": quota_bytes, "alarms": list(st.alarms),
            "warning": space_warning(st, quota_bytes)}


def _gpu_summary(node: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for g in node.get("gpus", []):
        counts[g.get("type", "?")] = counts.get(g.get("type", "?"), 0) + 1
    return ",".join(f"{n}x{t}" for t, n in sorted(counts.items())) or "-"


@app.command(epilog="Example:  ctl status --etcd 127.0.0.1:2379   |   ctl status -o json | jq '.etcd'   |   "
             "ctl status --etcd-quota 8GiB")
def status(
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    quota: EtcdQuotaOpt = "2GiB",
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Show nodes, model instances (model, state, endpoint, node, age), models (with demand), gateways and
    etcd's database size against its quota (a warning near it)."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    quota_bytes = etcd_quota(quota)
    data = run_async(lambda: read_status(config, quota_bytes))
    if output is OutputFormat.json:
        print_json(data)
        return
    now_ms = int(time.time() * 1000)
    print_table(
        ["node", "tenant", "gpus", "slurm job", "ends", "mode", "age"],
        [
            (
                n.get("node_ref"),
                n.get("tenant"),
                _gpu_summary(n),
                (n.get("slurm") or {}).get("job_id", "-"),
                _ends(int(n.get("end_time_unix", 0))),
                ("draining" if n.get("draining") else "pool" if n.get("pool") else "serve"),
                age(int(n.get("started_unix_ms", 0)), now_ms),
            )
            for n in data["nodes"]
        ],
        title=f"Nodes ({len(data['nodes'])})",
    )
    print_table(
        ["model", "instance", "tenant", "state", "routed", "endpoint", "node", "engine", "restarts", "age"],
        [
            (
                i.get("model"),
                i.get("instance_id"),
                i.get("tenant"),
                i.get("state", "INSTANCE_STATE_UNSPECIFIED"),
                "refused" if i["refused"] else "yes" if i["routable"] else "no",
                i.get("endpoint"),
                i.get("node_ref"),
                i.get("engine"),
                i.get("restarts", 0),
                age(int(i.get("started_unix_ms", 0)), now_ms),
            )
            for i in data["instances"]
        ],
        title=f"Instances ({len(data['instances'])})",
    )
    print_table(
        ["model", "ready", "instances", "refused", "servers", "min replicas", "catalog", "req/s", "in flight"],
        [(m["model"], m["ready"], m["instances"], m["refused"], ",".join(m["servers"]) or "any (community)",
          m["min_replicas"], "yes" if m["in_catalog"] else "no", f"{m['requests_per_second']:g}", m["in_flight"])
         for m in data["models"]],
        title=f"Models ({len(data['models'])})",
    )
    print_table(
        ["gateway", "address", "age"],
        [(g["gateway_id"], g.get("address") or "-", age(int(g.get("started_unix_ms", 0)), now_ms))
         for g in data["gateways"]],
        title=f"Gateways ({len(data['gateways'])})",
    )
    for i in data["instances"]:
        if i["refused"]:
            print(f"refused: instance {i.get('instance_id')} of tenant {i['tenant']}: {i['refused']}")
    e = data["etcd"]
    if "db_size_bytes" in e:
        print_table(["endpoint", "version", "db size", "in use", "quota", "used", "alarms"],
                    [(e["endpoint"], e["version"], human(e["db_size_bytes"]), human(e["db_size_in_use_bytes"]),
                      human(e["quota_bytes"]), f"{e['db_size_bytes'] / e['quota_bytes']:.1%}",
                      ",".join(e["alarms"]) or "-")], title="etcd")
    else:
        print(f"warning: etcd status: {e.get('error')}")
    if e.get("warning"):
        print(f"warning: {e['warning']}")
    for err in data["errors"]:
        print(f"warning: {err}")


def _ends(end_unix: int) -> str:
    if end_unix <= 0:
        return "-"
    left = end_unix - int(time.time())
    return f"in {left // 60}m" if left > 0 else "ended"


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
