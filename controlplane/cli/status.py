"""`ctl status`: what the pool looks like right now (nodes, instances, models)."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    open_store,
    run_async,
)
from controlplane.cli.main import app
from controlplane.cli.output import age, print_json, print_table
from controlplane.keys import Keys, RecordDecodeError, decode
from controlplane.pb import InstanceRecord, InstanceState, ModelSpec, NodeRecord
from controlplane.store import EtcdConfig


async def read_status(config: EtcdConfig) -> dict[str, Any]:
    """Read nodes, instances and the model catalog at one revision."""
    store = await open_store(config)
    keys = Keys(config.prefix)
    try:
        node_kvs, rev = await store.list_prefix(keys.nodes)
        inst_kvs, _ = await store.list_prefix(keys.instances, revision=rev)
        model_kvs, _ = await store.list_prefix(keys.models, revision=rev)
    finally:
        await store.close()
    errors: list[str] = []

    def parse(kvs: list[Any], msg: type[Any]) -> list[Any]:
        out = []
        for kv in kvs:
            try:
                out.append(decode(msg, kv))
            except RecordDecodeError as exc:
                errors.append(str(exc))
        return out

    nodes: list[NodeRecord] = parse(node_kvs, NodeRecord)
    instances: list[InstanceRecord] = parse(inst_kvs, InstanceRecord)
    specs: list[ModelSpec] = parse(model_kvs, ModelSpec)
    models: dict[str, dict[str, Any]] = {}
    for spec in specs:
        models[spec.name] = {"model": spec.name, "ready": 0, "instances": 0, "in_catalog": True,
                             "min_replicas": spec.min_replicas}
    for inst in instances:
        m = models.setdefault(inst.model, {"model": inst.model, "ready": 0, "instances": 0, "in_catalog": False,
                                           "min_replicas": 0})
        m["instances"] += 1
        m["ready"] += inst.state == InstanceState.READY
    return {
        "revision": rev,
        "nodes": [_dict(n) for n in nodes],
        "instances": [_dict(i) for i in instances],
        "models": sorted(models.values(), key=lambda m: m["model"]),
        "errors": errors,
    }


def _gpu_summary(node: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for g in node.get("gpus", []):
        counts[g.get("type", "?")] = counts.get(g.get("type", "?"), 0) + 1
    return ",".join(f"{n}x{t}" for t, n in sorted(counts.items())) or "-"


@app.command(epilog="Example:  ctl status --etcd 127.0.0.1:2379   |   ctl status -o json | jq '.instances'")
def status(
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Show nodes, model instances (model, state, endpoint, node, age) and models."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    data = run_async(lambda: read_status(config))
    if output is OutputFormat.json:
        print_json(data)
        return
    now_ms = int(time.time() * 1000)
    print_table(
        ["node", "gpus", "slurm job", "ends", "mode", "age"],
        [
            (
                n.get("node_id"),
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
        ["model", "instance", "state", "endpoint", "node", "engine", "restarts", "age"],
        [
            (
                i.get("model"),
                i.get("instance_id"),
                i.get("state", "INSTANCE_STATE_UNSPECIFIED"),
                i.get("endpoint"),
                i.get("node_id"),
                i.get("engine"),
                i.get("restarts", 0),
                age(int(i.get("started_unix_ms", 0)), now_ms),
            )
            for i in data["instances"]
        ],
        title=f"Instances ({len(data['instances'])})",
    )
    print_table(
        ["model", "ready", "instances", "min replicas", "catalog"],
        [(m["model"], m["ready"], m["instances"], m["min_replicas"], "yes" if m["in_catalog"] else "no")
         for m in data["models"]],
        title=f"Models ({len(data['models'])})",
    )
    for err in data["errors"]:
        print(f"warning: {err}")


def _ends(end_unix: int) -> str:
    if end_unix <= 0:
        return "-"
    left = end_unix - int(time.time())
    return f"in {left // 60}m" if left > 0 else "ended"


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
