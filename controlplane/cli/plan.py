"""`ctl plan`, `ctl apply`, `ctl planner run`: the placement planner against the live pool.

    ctl plan  ──▶ read etcd at revision R ─▶ snapshot ─▶ compute_plan ─▶ diff table (+ --out PLAN.json)
    ctl apply PLAN.json ──▶ one txn guarded by what the plan read (stale ─▶ exit 4, nothing written)
    ctl apply --auto-approve ──▶ both, back to back
    ctl planner run ──▶ leader-elected loop: plan, cap churn, apply (fenced by leadership), sleep
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

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
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys
from controlplane.logsetup import configure_logging
from controlplane.planner.apply import (
    ApplyError,
    ApplyResult,
    PlanFile,
    PlanFileError,
    StalePlan,
    apply_plan,
    plan_from_etcd,
    plan_from_snapshot,
)
from controlplane.planner.diff import PlanningError
from controlplane.planner.live import ClusterConfig, ClusterConfigError, load_demand
from controlplane.planner.snapshot import Snapshot, SnapshotError
from controlplane.store import EtcdConfig

planner_app = typer.Typer(help="Run the planner continuously (leader-elected).", no_args_is_help=True)
app.add_typer(planner_app, name="planner")

ClusterOpt = Annotated[Path | None, typer.Option("--cluster", envvar="MODELPOOL_CLUSTER",
                                                 help="Cluster file: GPU prices/speeds, profiles, budget "
                                                 "(see examples/cluster.yaml).")]
DemandOpt = Annotated[Path | None, typer.Option("--demand", help="Demand override {model: requests/s} instead of "
                                                "the gateways' demand records.")]
TimeLimitOpt = Annotated[float, typer.Option("--time-limit", min=0.1, help="Solver time limit in seconds.")]


def _quiet_logs() -> None:
    """One-shot commands: logs to stderr, warnings and up unless MODELPOOL_LOG_LEVEL says otherwise."""
    configure_logging(level=os.environ.get("MODELPOOL_LOG_LEVEL", "warning"), component="ctl")


def _load_cluster(path: Path | None) -> ClusterConfig:
    if path is None:
        fail("give --cluster FILE (GPU prices and speeds; see examples/cluster.yaml)", ExitCode.USAGE)
    try:
        return ClusterConfig.load(path)
    except ClusterConfigError as exc:
        fail(str(exc), ExitCode.USAGE)


def _load_demand(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    try:
        return load_demand(path)
    except SnapshotError as exc:
        fail(str(exc), ExitCode.USAGE)


def applied_by(what: str) -> str:
    """Who applies: ``user@host what``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} {what}"


def save_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Write a snapshot so `ctl plan --snapshot FILE` (Snapshot.load) replays it."""
    data = snapshot.model_dump(mode="json")
    text = json.dumps(data, indent=2) if path.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")


def render_plan(pf: PlanFile) -> None:
    """The per-node diff table and the summary, for humans."""
    rows = [(a.node_id, a.kind.value, a.model, a.tp, a.gpu_type or "-", ",".join(map(str, a.gpu_indices)),
             a.assignment_id) for a in sorted(pf.actions, key=lambda a: (a.node_id, a.kind.value, a.model))]
    print_table(["node", "action", "model", "tp", "gpu type", "gpus", "assignment"], rows,
                title=f"Plan {pf.plan_id[:12]} ({pf.source}, revision {pf.computed_at_revision})")
    s = pf.summary
    cov = s.get("coverage", {})
    print_table(["model", "demand req/s", "capacity req/s", "served", "replicas", "nodes", "min"],
                [(m, f"{c['demand_rps']:g}", f"{c['capacity_rps']:.2f}",
                  f"{100 * (c['served_rps'] / c['demand_rps'] if c['demand_rps'] else 1.0):.0f}%",
                  c["replicas"], c["distinct_nodes"], c["min_replicas"]) for m, c in cov.items()],
                title="Coverage")
    counts = s.get("counts", {})
    gpus = ", ".join(f"{n}x {t}" for t, n in s.get("gpus_used_by_type", {}).items()) or "none"
    print(f"cost {s.get('cost_per_hour', 0):.2f}/h | GPUs {gpus} | "
          f"{counts.get('START', 0)} start, {counts.get('STOP', 0)} stop, {counts.get('KEEP', 0)} keep | "
          f"solver {s.get('status')} in {s.get('solve_time_s', 0):.2f}s")
    for note in pf.warnings:
        print(f"note: {note}", file=sys.stderr)


def _emit(pf: PlanFile, output: OutputFormat, result: ApplyResult | None = None) -> None:
    if output is OutputFormat.json:
        data = pf.model_dump(mode="json")
        if result is not None:
            data["applied"] = {"revision": result.revision, "started": result.started, "stopped": result.stopped,
                               "kept": result.kept}
        print_json(data)
    else:
        render_plan(pf)


async def _plan_live(config: EtcdConfig, cluster: ClusterConfig, demand: dict[str, float] | None, now: float,
                     time_limit: float, save: Path | None) -> PlanFile:
    store = await open_store(config)
    try:
        live = await plan_from_etcd(store, Keys(config.prefix), cluster, now, time_limit_s=time_limit,
                                    demand_override=demand)
    finally:
        await store.close()
    if save is not None:
        save_snapshot(live.assembly.snapshot, save)
    return live.plan_file


async def _apply(config: EtcdConfig, pf: PlanFile, who: str) -> ApplyResult:
    store = await open_store(config)
    try:
        return await apply_plan(store, Keys(config.prefix), pf, who)
    finally:
        await store.close()


@app.command(epilog="Examples:  ctl plan --cluster examples/cluster.yaml --out plan.json   |   "
             "ctl plan --snapshot examples/snapshot-small.yaml -o json")
def plan(
    snapshot: Annotated[Path | None, typer.Option("--snapshot", help="Plan this snapshot file instead of the live "
                                                  "pool (replay; the result cannot be applied).")] = None,
    cluster: ClusterOpt = None,
    demand: DemandOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the plan file here (for `ctl apply`).")] = None,
    save_snapshot_to: Annotated[Path | None, typer.Option("--save-snapshot", help="Write the assembled snapshot "
                                                          "here (replay with --snapshot).")] = None,
    time_limit: TimeLimitOpt = 10.0,
    now: Annotated[float | None, typer.Option("--now", help="Plan as of this unix time (default: now).")] = None,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Compute a plan and show it. Exit 0: no changes, 1: changes, other: error."""
    _quiet_logs()
    at = now if now is not None else time.time()
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    try:
        if snapshot is not None:
            snap = Snapshot.load(snapshot)
            override = _load_demand(demand)
            if override is not None:
                snap = snap.model_copy(update={"demand": override})
            _, pf = plan_from_snapshot(snap, Keys(config.prefix), at, time_limit_s=time_limit,
                                       source=f"snapshot {snapshot}")
            if save_snapshot_to is not None:
                save_snapshot(snap, save_snapshot_to)
        else:
            cfg = _load_cluster(cluster)
            pf = run_async(lambda: _plan_live(config, cfg, _load_demand(demand), at, time_limit, save_snapshot_to))
    except SnapshotError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (PlanningError, ApplyError) as exc:
        fail(str(exc))
    if out is not None:
        pf.save(out)
    _emit(pf, output)
    if out is not None and output is OutputFormat.table:
        print(f"plan written to {out}; apply with: ctl apply {out}")
    raise typer.Exit(int(ExitCode.CHANGES if pf.changes else ExitCode.OK))


@app.command(name="apply", epilog="Examples:  ctl apply plan.json   |   "
             "ctl apply --auto-approve --cluster examples/cluster.yaml")
def apply_cmd(
    plan_file: Annotated[Path | None, typer.Argument(help="A plan file written by `ctl plan --out`.")] = None,
    auto_approve: Annotated[bool, typer.Option("--auto-approve", help="Plan against the live pool and apply at "
                                               "once (no plan file).")] = False,
    cluster: ClusterOpt = None,
    demand: DemandOpt = None,
    time_limit: TimeLimitOpt = 10.0,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Apply a plan in one guarded transaction; a stale plan writes nothing and exits 4."""
    _quiet_logs()
    if (plan_file is None) == (not auto_approve):
        fail("give a plan file, or --auto-approve to plan and apply at once (not both)", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    try:
        if plan_file is not None:
            try:
                pf = PlanFile.load(plan_file)
            except PlanFileError as exc:  # a missing or malformed argument is a usage error
                fail(str(exc), ExitCode.USAGE)
        else:
            cfg = _load_cluster(cluster)
            pf = run_async(lambda: _plan_live(config, cfg, _load_demand(demand), time.time(), time_limit, None))
        result = run_async(lambda: _apply(config, pf, applied_by("ctl apply")))
    except StalePlan as exc:
        fail(str(exc), ExitCode.CONFLICT)
    except SnapshotError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (ApplyError, PlanningError) as exc:
        fail(str(exc))
    _emit(pf, output, result)
    if output is OutputFormat.table:
        print(f"applied plan {pf.plan_id[:12]} at revision {result.revision}: {result.started} started, "
              f"{result.stopped} stopped, {result.kept} kept")


@planner_app.command(name="run", epilog="Example:  ctl planner run --cluster examples/cluster.yaml --interval 30 "
                     "--max-churn 8")
def planner_run(
    cluster: ClusterOpt = None,
    demand: DemandOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between planning rounds.")] = 30.0,
    max_churn: Annotated[int, typer.Option("--max-churn", min=0, help="Most START+STOP per round (0 = no cap); "
                                           "the most valuable changes go first.")] = 0,
    time_limit: TimeLimitOpt = 5.0,
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, help="Leader lease TTL in seconds.")] = 10,
    planner_id: Annotated[str, typer.Option("--id", help="This planner's identity (default: user@host pid).")] = "",
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
) -> None:
    """Plan and apply every --interval seconds while holding the planner leadership."""
    from controlplane.planner.daemon import DaemonConfig, PlannerDaemon

    configure_logging(component="planner")
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    cfg = DaemonConfig(cluster=_load_cluster(cluster), demand_override=_load_demand(demand), interval_s=interval,
                       max_churn=max_churn, time_limit_s=time_limit, lease_ttl=lease_ttl,
                       identity=planner_id or applied_by(f"planner pid {os.getpid()}"))

    async def main() -> None:
        store = await open_store(config)
        daemon = PlannerDaemon(store, Keys(config.prefix), cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        try:
            await daemon.run()
        finally:
            await store.close()

    run_async(main, exit_within_s=10)
