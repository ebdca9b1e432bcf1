"""`ctl nodes list | show | drain | undrain`: the agents in the pool, and asking one to drain.

A drain request is a NodeControl record at ``control/nodes/<node>``; the agent watches it.
Nodes are named by their ref, ``<tenant>/<node_id>`` (a legacy node: its id); a bare node id that
exactly one tenant uses names that tenant's node.

    drain    ──► node registered? (else exit 3 unless --force) ──► txn put NodeControl(drain=true)
                     serve-mode agent: drains every instance, removes its records, exits 0
                     pool-mode agent:  marks the node draining, stops its assignments, stays
    undrain  ──► delete control/nodes/<node>   (a pool agent takes work again; a serve agent
                                                 that already began its drain finishes it)
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict

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
from controlplane.cli.output import age, print_json, print_table
from controlplane.keys import Keys, RecordDecodeError, decode, decode_all, decode_segment
from controlplane.pb import InstanceRecord, InstanceState, NodeControl, NodeRecord
from controlplane.poolstate import read_pool
from controlplane.store import Cmp, EtcdConfig, EtcdStore, Op
from controlplane.tenancy import split_node_ref

nodes_app = typer.Typer(
    help="List the pool's nodes (agents) and drain or undrain one.",
    no_args_is_help=True,
)
app.add_typer(nodes_app, name="nodes")

NodeArg = Annotated[str, typer.Argument(help="Node, as `ctl nodes list` shows it (tenant/node-id, or a node id "
                                                "that only one tenant uses).")]


# -- pure core ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodesSnapshot:
    """Nodes, instances and drain controls read at one etcd revision."""

    revision: int
    nodes: dict[str, NodeRecord]          # by node ref
    instances: list[InstanceRecord]       # node_id rewritten to the node's ref
    controls: dict[str, NodeControl]      # by node ref
    warnings: list[str] = field(default_factory=list)
    tenants: dict[str, str] = field(default_factory=dict)   # node ref -> tenant

    def resolve(self, name: str) -> str:
        """The node ref ``name`` means: itself when it is a known ref, else the one tenant node
        with that id (several: ``name`` unchanged, so the caller reports it as unknown)."""
        if name in self.nodes or name in self.controls:
            return name
        matches = {ref for ref in (*self.nodes, *self.controls) if "/" in ref and ref.split("/", 1)[1] == name}
        return matches.pop() if len(matches) == 1 else name


def gpu_summary(types: Iterable[str]) -> str:
    """``["A100", "A100", "H100"]`` → ``2xA100,1xH100``; ``-`` when there are none."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t or "?"] = counts.get(t or "?", 0) + 1
    return ",".join(f"{n}x{t}" for t, n in sorted(counts.items())) or "-"


def ends_in(end_unix: int, now: float) -> str:
    """How long until ``end_unix``: ``45s``, ``12m``, ``3h05m``, ``2d4h``; ``ended``; ``-`` when unknown."""
    if end_unix <= 0:
        return "-"
    left = int(end_unix - now)
    if left <= 0:
        return "ended"
    if left < 60:
        return f"{left}s"
    if left < 3600:
        return f"{left // 60}m"
    if left < 86400:
        return f"{left // 3600}h{left % 3600 // 60:02d}m"
    return f"{left // 86400}d{left % 86400 // 3600}h"


def drain_state(node: NodeRecord | None, control: NodeControl | None) -> str:
    """``yes`` (the agent says it drains), ``requested`` (asked, not yet acknowledged), or ``no``."""
    if node is not None and node.draining:
        return "yes"
    if control is not None and control.drain:
        return "requested"
    return "no"


def node_view(node_id: str, node: NodeRecord | None, instances: Sequence[InstanceRecord],
              control: NodeControl | None, now: float) -> dict[str, Any]:
    """What `ctl nodes` shows of one node id (registered, pre-drained, or both)."""
    slurm = node.slurm if node is not None and node.HasField("slurm") else None
    end_unix = (node.end_time_unix or (slurm.end_time_unix if slurm else 0)) if node is not None else 0
    mine = sorted((i for i in instances if i.node_id == node_id), key=lambda i: (i.model, i.instance_id))
    return {
        "node_id": node_id,
        "tenant": split_node_ref(node_id)[0],
        "registered": node is not None,
        "hostname": node.hostname if node else "",
        "address": node.address if node else "",
        "mode": ("pool" if node.pool else "serve") if node else "-",
        "gpus": gpu_summary(g.type for g in node.gpus) if node else "-",
        "gpu_count": len(node.gpus) if node else 0,
        "free_gpus": len(node.free_gpu_indices) if node else 0,
        "free_gpu_indices": list(node.free_gpu_indices) if node else [],
        "slurm_job_id": slurm.job_id if slurm else "",
        "partition": slurm.partition if slurm else "",
        "slurm_user": slurm.user if slurm else "",
        "end_time_unix": end_unix,
        "ends_in": ends_in(end_unix, now),
        "draining": drain_state(node, control),
        "drain_request": _message_dict(control) if control is not None and control.drain else None,
        "instances": [{"instance_id": i.instance_id, "model": i.model, "state": InstanceState.Name(i.state),
                       "endpoint": i.endpoint, "gpu_indices": list(i.gpu_indices), "restarts": i.restarts,
                       "started_unix_ms": i.started_unix_ms} for i in mine],
        "started_unix_ms": node.started_unix_ms if node else 0,
        "age": age(node.started_unix_ms, int(now * 1000)) if node else "-",
        "agent_version": node.agent_version if node else "",
        "labels": dict(node.labels) if node else {},
        "gpu_details": [_message_dict(g) for g in node.gpus] if node else [],
    }


def node_views(snapshot: NodesSnapshot, now: float) -> list[dict[str, Any]]:
    """One view per node id that has a record or a drain request, sorted by id."""
    ids = sorted(set(snapshot.nodes) | {n for n, c in snapshot.controls.items() if c.drain})
    return [node_view(n, snapshot.nodes.get(n), snapshot.instances, snapshot.controls.get(n), now) for n in ids]


def instances_cell(view: dict[str, Any]) -> str:
    """``2: m1,m2`` for the list table (each model once)."""
    insts = view["instances"]
    if not insts:
        return "0"
    models = list(dict.fromkeys(i["model"] for i in insts))
    return f"{len(insts)}: {','.join(models)}"


def drain_progress(node_id: str, snapshot: NodesSnapshot) -> tuple[bool, int]:
    """(drained, instances left): a serve agent is drained once its node record is gone, a pool
    agent once it reports draining with no instance left on the node."""
    left = sum(1 for i in snapshot.instances if i.node_id == node_id)
    node = snapshot.nodes.get(node_id)
    return (node is None or (node.draining and left == 0)), left


def drain_control(node_id: str, reason: str, requested_by: str, now: float) -> NodeControl:
    """The record `ctl nodes drain` writes."""
    return NodeControl(node_id=node_id, drain=True, reason=reason, requested_unix_ms=int(now * 1000),
                       requested_by=requested_by)


def default_requester() -> str:
    """``$USER@host`` of whoever runs `ctl` (recorded in the drain request)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname().split('.')[0]}"


def _message_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# -- etcd shell ---------------------------------------------------------------------------------


class NodeNotRegistered(LookupError):
    """`ctl nodes drain` named a node with no record (and no --force)."""


async def read_nodes(config: EtcdConfig) -> NodesSnapshot:
    """Nodes, instances and controls at one revision; undecodable records become warnings."""
    store = await open_store(config)
    try:
        return await _read_nodes(store, Keys(config.prefix))
    finally:
        await store.close()


async def _read_nodes(store: EtcdStore, keys: Keys) -> NodesSnapshot:
    pool = await read_pool(store, keys)
    ctl_kvs, _ = await store.list_prefix(keys.node_controls, revision=pool.revision)
    warnings: list[str] = list(pool.warnings)
    nodes = {n.ref: n.record for n in pool.nodes}
    instances = []
    for entry in pool.instances:
        inst = InstanceRecord()
        inst.CopyFrom(entry.record)
        inst.node_id = entry.node_ref
        instances.append(inst)
    controls = {decode_segment(kv.key.rsplit("/", 1)[-1]): c for kv, c in decode_all(NodeControl, ctl_kvs, warnings)}
    return NodesSnapshot(pool.revision, nodes, instances, controls, warnings, {n.ref: n.tenant for n in pool.nodes})


async def resolve_node(config: EtcdConfig, name: str) -> str:
    """The node ref ``name`` means (see ``NodesSnapshot.resolve``)."""
    return (await read_nodes(config)).resolve(name)


async def request_drain(config: EtcdConfig, control: NodeControl, *, force: bool) -> bool:
    """Write the drain request; returns whether the node was registered at that moment.

    Without ``force`` the write is guarded on the node record existing (one transaction, so a
    node that vanishes between a read and the write cannot be pre-drained by accident) and
    NodeNotRegistered is raised when it does not.
    """
    keys = Keys(config.prefix)
    node_key, control_key = keys.node_key_of_ref(control.node_id), keys.node_control(control.node_id)
    put = Op.put(control_key, control.SerializeToString())
    store = await open_store(config)
    try:
        registered, _ = await store.txn([Cmp.create_revision(node_key, 0, ">")], [put])
        if not registered:
            if not force:
                raise NodeNotRegistered(f"no node {control.node_id!r} is registered (see `ctl nodes list`); "
                                        "use --force to drain it as soon as it registers")
            await store.put(control_key, control.SerializeToString())
    finally:
        await store.close()
    return registered


async def clear_drain(config: EtcdConfig, node_id: str) -> tuple[bool, NodeRecord | None]:
    """Delete the drain request; returns (whether one existed, the node record if registered)."""
    keys = Keys(config.prefix)
    store = await open_store(config)
    try:
        deleted = await store.delete(keys.node_control(node_id))
        kv = await store.get(keys.node_key_of_ref(node_id))
    finally:
        await store.close()
    node = None
    if kv is not None:
        try:
            node = decode(NodeRecord, kv)
        except RecordDecodeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
    return deleted > 0, node


# -- commands -----------------------------------------------------------------------------------


@nodes_app.command(name="list", epilog="Example:  ctl nodes list   |   ctl nodes list -o json | "
                                       "jq '.[] | select(.draining != \"no\") | .node_id'")
def list_nodes(
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List nodes: GPUs by type, free GPUs, Slurm job / partition / time left, mode, drain, instances, age."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    snapshot = run_async(lambda: read_nodes(config))
    views = node_views(snapshot, time.time())
    warn(snapshot.warnings)
    if output is OutputFormat.json:
        print_json(views)
        return
    print_table(
        ["node", "gpus", "free", "slurm job", "partition", "ends in", "mode", "draining", "instances", "age"],
        [(v["node_id"], v["gpus"], v["free_gpus"] if v["registered"] else "-", v["slurm_job_id"] or "-",
          v["partition"] or "-", v["ends_in"], v["mode"],
          v["draining"] if v["registered"] else "requested (not registered)", instances_cell(v), v["age"])
         for v in views],
        title=f"Nodes ({sum(v['registered'] for v in views)})",
    )


@nodes_app.command(epilog="Example:  ctl nodes show gpu017-job4242   |   ctl nodes show gpu017-job4242 -o json")
def show(
    node: NodeArg,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Show one node: address, GPUs, Slurm job, labels, drain request and its instances."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    snapshot = run_async(lambda: read_nodes(config))
    warn(snapshot.warnings)
    node = snapshot.resolve(node)
    if node not in snapshot.nodes and node not in snapshot.controls:
        fail(f"no node {node!r} (see `ctl nodes list`)", ExitCode.NOT_FOUND)
    now = time.time()
    v = node_view(node, snapshot.nodes.get(node), snapshot.instances, snapshot.controls.get(node), now)
    if output is OutputFormat.json:
        print_json(v)
        return
    req = v["drain_request"]
    lines = [("node", v["node_id"] + ("" if v["registered"] else "  (not registered)"))]
    if v["registered"]:
        lines += [("host", f"{v['hostname']} ({v['address']})"), ("mode", v["mode"]),
                  ("gpus", f"{v['gpus']}  free: {','.join(map(str, v['free_gpu_indices'])) or 'none'}"),
                  ("slurm job", (f"{v['slurm_job_id']} partition {v['partition'] or '-'} user "
                                 f"{v['slurm_user'] or '-'}, ends in {v['ends_in']}") if v["slurm_job_id"] else "-"),
                  ("labels", ",".join(f"{k}={val}" for k, val in sorted(v["labels"].items())) or "-"),
                  ("agent", f"{v['agent_version']}, up {v['age']}")]
    lines.append(("draining", v["draining"]))
    if req:
        when = age(int(req["requested_unix_ms"]), int(now * 1000))
        lines.append(("drain request", f"by {req['requested_by'] or '?'} {when} ago"
                                       + (f": {req['reason']}" if req["reason"] else "")))
    width = max(len(k) for k, _ in lines) + 2
    for k, val in lines:
        print(f"{k + ':':<{width}}{val}")
    if v["instances"]:
        print()
        print_table(["instance", "model", "state", "endpoint", "gpus", "restarts", "age"],
                    [(i["instance_id"], i["model"], i["state"], i["endpoint"], ",".join(map(str, i["gpu_indices"])),
                      i["restarts"], age(int(i["started_unix_ms"]), int(now * 1000))) for i in v["instances"]],
                    title=f"Instances ({len(v['instances'])})")


@nodes_app.command(epilog="Example:  ctl nodes drain gpu017-job4242 --reason 'GPU 3 ECC errors' --wait")
def drain(
    node: NodeArg,
    reason: Annotated[str, typer.Option("--reason", help="Why; shown in `ctl nodes show` and the agent's log.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Write the request even if the node is not registered "
                                        "(it drains as soon as it registers).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Return only when the node has drained (no instance left; "
                                       "a serve agent has exited).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="With --wait: give up after this many "
                                           "seconds (exit 255; the drain goes on).")] = 900.0,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Ask a node to drain (writes control/nodes/NODE).

    A serve-mode agent drains its instances and exits; a pool-mode agent stops its assignments
    and takes no new ones until `ctl nodes undrain`.
    """
    if not node.strip():
        fail("NODE must not be empty", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    node = run_async(lambda: resolve_node(config, node))
    control = drain_control(node, reason, default_requester(), time.time())
    try:
        registered = run_async(lambda: request_drain(config, control, force=force))
    except NodeNotRegistered as exc:
        fail(str(exc), ExitCode.NOT_FOUND)
    if output is OutputFormat.json:
        print_json({"node_id": node, "drain": True, "registered": registered, "reason": reason,
                    "requested_by": control.requested_by})
    elif registered:
        print(f"drain requested for node {node} (by {control.requested_by})")
    else:
        print(f"node {node} is not registered; it will drain as soon as it registers "
              f"(`ctl nodes undrain {node}` cancels)")
    if wait and registered:
        _wait_drained(config, node, timeout, quiet=output is OutputFormat.json)


def _wait_drained(config: EtcdConfig, node: str, timeout: float, *, quiet: bool) -> None:
    """Poll until ``node`` has drained, with a spinner showing the instances left."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

    async def wait(progress: Progress, task: TaskID) -> int | None:
        """None once drained, else the instances left when the timeout passed (one etcd connection)."""
        deadline = time.monotonic() + timeout
        store = await open_store(config)
        try:
            while True:
                done, left = drain_progress(node, await _read_nodes(store, Keys(config.prefix)))
                if done:
                    return None
                if time.monotonic() > deadline:
                    return left
                progress.update(task, description=f"draining {node}: {left} instance(s) left")
                await asyncio.sleep(0.5)
        finally:
            await store.close()

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=quiet) as progress:
        left = run_async(lambda: wait(progress, progress.add_task(f"draining {node}")))
    if left is not None:
        state = f"still has {left} instance(s)" if left else "has not acknowledged the drain"
        fail(f"node {node} {state} after {timeout:g} s; the drain goes on (`ctl nodes show {node}`)", ExitCode.ERROR)
    if not quiet:
        print(f"node {node} drained")


@nodes_app.command(epilog="Example:  ctl nodes undrain gpu017-job4242")
def undrain(
    node: NodeArg,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Cancel a drain request (deletes control/nodes/NODE).

    A pool-mode node takes work again; a serve-mode agent that already began draining still
    finishes and exits.
    """
    if not node.strip():
        fail("NODE must not be empty", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    node = run_async(lambda: resolve_node(config, node))
    existed, record = run_async(lambda: clear_drain(config, node))
    if output is OutputFormat.json:
        print_json({"node_id": node, "drain": False, "had_request": existed, "registered": record is not None})
        return
    if not existed:
        print(f"node {node} had no drain request; nothing changed")
        return
    print(f"drain request for node {node} removed")
    if record is not None and not record.pool and record.draining:
        print(f"note: {node} is a serve-mode agent that already began draining; it finishes and exits",
              file=sys.stderr)
