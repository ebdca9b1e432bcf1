"""`ctl harvest run | plan | status`: acquire Slurm GPUs for unmet demand, give idle ones back.

    ctl harvest run    ──▶ check flags against Slurm (exit 2 on bad input) ──▶ leader-elected loop
    ctl harvest plan   ──▶ one round's decision, nothing done (exit 0: no changes, 1: changes)
    ctl harvest status ──▶ harvested jobs, GPU-hours against the budget, the leader's notes

The decision model, flags and records: docs/harvest.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli.agent import parse_pairs
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
from controlplane.cli.harvest_view import render_plan, render_status, status_data
from controlplane.cli.main import app
from controlplane.cli.plan import (
    ClusterOpt,
    DemandOpt,
    TimeLimitOpt,
    _load_cluster,
    _load_demand,
    _quiet_logs,
    applied_by,
)
from controlplane.harvest.config import GresMapping, check_settings, parse_gres_types
from controlplane.harvest.daemon import HarvestDaemon, HarvestDaemonConfig, JobTemplate, job_name
from controlplane.harvest.errors import HarvestConfigError, SlurmCommandError
from controlplane.harvest.model import HarvestPlan, HarvestSettings
from controlplane.harvest.slurm import Slurm
from controlplane.keys import Keys
from controlplane.logsetup import configure_logging
from controlplane.planner.live import ClusterConfig
from controlplane.store import EtcdConfig

harvest_app = typer.Typer(help="Harvest idle Slurm GPUs for unmet demand, within a budget (docs/harvest.md).",
                          no_args_is_help=True)
app.add_typer(harvest_app, name="harvest")

DEFAULT_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "slurm" / "pool.sbatch"

PartitionOpt = Annotated[list[str] | None, typer.Option("--partition", help="Slurm partition to harvest; "
                                                        "repeatable, in order of preference.")]
GresOpt = Annotated[list[str] | None, typer.Option("--gres-type", help="SLURM_TYPE=GPU_TYPE, e.g. a100=A100-80GB "
                                                   "(TYPE:24GB for a type the agent does not know; a100= to leave "
                                                   "a type alone); repeatable.")]
IntervalOpt = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between harvest rounds.")]
IdleOpt = Annotated[float, typer.Option("--idle-release-after", min=0, help="Give a job back once its GPUs carried "
                                        "no assignment for this many seconds.")]
PendingOpt = Annotated[float, typer.Option("--pending-timeout", min=0, help="Cancel a job pending longer than this "
                                           "(seconds).")]
JoinOpt = Annotated[float, typer.Option("--join-timeout", min=0, help="Cancel a running job whose agent has not "
                                        "registered after this many seconds.")]
DrainOpt = Annotated[float, typer.Option("--drain-timeout", min=0, help="Cancel a released job this many seconds "
                                         "after its drain began, engines gone or not.")]
BudgetOpt = Annotated[float, typer.Option("--budget-gpu-hours-per-day", min=0, help="GPU-hours of harvested jobs' "
                                          "running time per rolling 24 h (0 = unlimited).")]
MaxJobsOpt = Annotated[int, typer.Option("--max-jobs", min=0, help="Most harvested jobs at once.")]
TimeOpt = Annotated[int, typer.Option("--time", min=1, help="Job time limit in minutes (sbatch --time).")]
MaxGpusOpt = Annotated[int, typer.Option("--max-gpus-per-job", min=1, help="Most GPUs one job asks for.")]
LatencyOpt = Annotated[float, typer.Option("--start-latency", min=0, help="Expected seconds from sbatch to serving; "
                                           "its GPU-time counts against acquiring.")]


def _settings(cluster: ClusterConfig, partitions: list[str] | None, gres_types: list[str] | None, interval: float,
              idle: float, pending: float, join: float, drain: float, budget: float, max_jobs: int, time_min: int,
              max_gpus: int, latency: float, prefix: str) -> tuple[HarvestSettings, GresMapping]:
    try:
        gres = parse_gres_types(gres_types or [])
    except HarvestConfigError as exc:
        fail(str(exc), ExitCode.USAGE)
    if not partitions:
        fail("give at least one --partition", ExitCode.USAGE)
    return HarvestSettings(
        partitions=tuple(partitions), gres_types=gres.types, gpu_memory_gib=gres.memory_gib, interval_s=interval,
        idle_release_after_s=idle, pending_timeout_s=pending, join_timeout_s=join, drain_timeout_s=drain,
        budget_gpu_hours_per_day=budget, max_jobs=max_jobs, time_limit_s=time_min * 60, start_latency_s=latency,
        max_gpus_per_job=max_gpus, job_name=job_name(prefix)), gres


async def _check_against_slurm(slurm: Slurm, st: HarvestSettings, gres: GresMapping, cluster: ClusterConfig) -> None:
    try:
        partitions = await slurm.partitions()
        nodes = await slurm.nodes()
    except SlurmCommandError as exc:
        fail(f"Slurm cannot be asked: {exc}", ExitCode.UNAVAILABLE)
    problems, warnings = check_settings(st.partitions, gres, st.time_limit_s, cluster, partitions, nodes)
    warn(warnings)
    if problems:
        fail("; ".join(problems), ExitCode.USAGE)


@harvest_app.command(name="run", epilog="Example:  ctl harvest run --cluster examples/cluster.yaml --partition gpu "
                     "--gres-type a100=A100-80GB --gres-type rtx4090=RTX4090 --budget-gpu-hours-per-day 200 "
                     "--max-jobs 8 --time 240")
def harvest_run(
    cluster: ClusterOpt = None, partition: PartitionOpt = None, gres_type: GresOpt = None,
    interval: IntervalOpt = 60.0, idle_release_after: IdleOpt = 900.0, pending_timeout: PendingOpt = 900.0,
    join_timeout: JoinOpt = 900.0, drain_timeout: DrainOpt = 120.0, budget_gpu_hours_per_day: BudgetOpt = 0.0,
    max_jobs: MaxJobsOpt = 4, time_min: TimeOpt = 240, max_gpus_per_job: MaxGpusOpt = 8,
    start_latency: LatencyOpt = 300.0,
    sbatch_env: Annotated[list[str] | None, typer.Option("--sbatch-env", help="KEY=VALUE in the jobs' environment "
                                                         "(e.g. ENGINE=sim, CTL=/opt/mp/bin/ctl); repeatable.")] = None,
    declare_gpus: Annotated[bool, typer.Option("--declare-gpus", help="Set GPUS=<n>x<GPU_TYPE> in the job "
                                               "(hosts without NVML, tests).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide and log; submit, cancel and write "
                                          "nothing.")] = False,
    script: Annotated[Path, typer.Option("--script", help="The pool job script.")] = DEFAULT_SCRIPT,
    job_signal: Annotated[str, typer.Option("--signal", help="sbatch --signal of the jobs (the pre-end drain).")] =
    "B:USR1@120",
    job_dir: Annotated[Path | None, typer.Option("--job-dir", help="Jobs' working directory (their output files; "
                                                 "default: this one).")] = None,
    sbatch_arg: Annotated[list[str] | None, typer.Option("--sbatch-arg", help="Extra sbatch option, one per flag "
                                                         "(e.g. --sbatch-arg=--account=lab); repeatable.")] = None,
    demand: DemandOpt = None, time_limit: TimeLimitOpt = 5.0,
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, help="Leader lease TTL in seconds.")] = 10,
    harvester_id: Annotated[str, typer.Option("--id", help="This harvester's identity (default: user@host pid).")] = "",
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
) -> None:
    """Submit pool jobs for demand the pool cannot serve and give idle ones back, while leader."""
    configure_logging(component="harvest")
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    cfg = _load_cluster(cluster)
    st, gres = _settings(cfg, partition, gres_type, interval, idle_release_after, pending_timeout, join_timeout,
                         drain_timeout, budget_gpu_hours_per_day, max_jobs, time_min, max_gpus_per_job,
                         start_latency, config.prefix)
    if not script.is_file():
        fail(f"--script {script}: no such file", ExitCode.USAGE)
    template = JobTemplate(script=script.resolve(), etcd_endpoints=",".join(config.endpoints),
                           etcd_prefix=config.prefix, env=parse_pairs(sbatch_env or [], "--sbatch-env"),
                           declare_gpus=declare_gpus, signal=job_signal,
                           job_dir=job_dir.resolve() if job_dir else None, extra_args=tuple(sbatch_arg or []))
    daemon_cfg = HarvestDaemonConfig(settings=st, cluster=cfg, template=template, lease_ttl=lease_ttl,
                                     identity=harvester_id or applied_by(f"harvest pid {os.getpid()}"),
                                     solver_time_limit_s=time_limit, dry_run=dry_run,
                                     demand_override=_load_demand(demand))

    async def main() -> None:
        slurm = Slurm()
        await _check_against_slurm(slurm, st, gres, cfg)
        store = await open_store(config)
        daemon = HarvestDaemon(store, Keys(config.prefix), daemon_cfg, slurm)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        try:
            await daemon.run()
        finally:
            await store.close()

    run_async(main, exit_within_s=10)


@harvest_app.command(name="plan", epilog="Example:  ctl harvest plan --cluster examples/cluster.yaml --partition gpu "
                     "--gres-type a100=A100-80GB --budget-gpu-hours-per-day 200 -o json")
def harvest_plan(
    cluster: ClusterOpt = None, partition: PartitionOpt = None, gres_type: GresOpt = None,
    idle_release_after: IdleOpt = 900.0, pending_timeout: PendingOpt = 900.0, join_timeout: JoinOpt = 900.0,
    drain_timeout: DrainOpt = 120.0, budget_gpu_hours_per_day: BudgetOpt = 0.0, max_jobs: MaxJobsOpt = 4,
    time_min: TimeOpt = 240, max_gpus_per_job: MaxGpusOpt = 8, start_latency: LatencyOpt = 300.0,
    demand: DemandOpt = None, time_limit: TimeLimitOpt = 5.0,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, output: OutputOpt = OutputFormat.table,
) -> None:
    """What one harvest round would submit and cancel now, and why. Exit 0: no changes, 1: changes."""
    _quiet_logs()
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    cfg = _load_cluster(cluster)
    st, gres = _settings(cfg, partition, gres_type, 60.0, idle_release_after, pending_timeout, join_timeout,
                         drain_timeout, budget_gpu_hours_per_day, max_jobs, time_min, max_gpus_per_job,
                         start_latency, config.prefix)
    template = JobTemplate(script=DEFAULT_SCRIPT, etcd_endpoints=",".join(config.endpoints), etcd_prefix=config.prefix)
    daemon_cfg = HarvestDaemonConfig(settings=st, cluster=cfg, template=template, identity="ctl harvest plan",
                                     solver_time_limit_s=time_limit, dry_run=True, demand_override=_load_demand(demand))

    async def main() -> HarvestPlan:
        slurm = Slurm()
        await _check_against_slurm(slurm, st, gres, cfg)
        store = await open_store(config)
        try:
            return await HarvestDaemon(store, Keys(config.prefix), daemon_cfg, slurm).round()
        except SlurmCommandError as exc:
            fail(str(exc), ExitCode.UNAVAILABLE)
        finally:
            await store.close()

    plan = run_async(main)
    render_plan(plan, output)
    raise typer.Exit(int(ExitCode.CHANGES if plan.changes else ExitCode.OK))


@harvest_app.command(name="status", epilog="Example:  ctl harvest status   |   ctl harvest status -o json | "
                     "jq '.budget'")
def harvest_status(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, output: OutputOpt = OutputFormat.table,
) -> None:
    """Harvested jobs and their states, GPU-hours in the last 24 h against the budget, and why."""
    _quiet_logs()
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    data = run_async(lambda: _status(config))
    render_status(data, output)


async def _status(config: EtcdConfig) -> dict[str, Any]:
    from controlplane.harvest.live import read_harvest

    store = await open_store(config)
    try:
        read = await read_harvest(store, Keys(config.prefix))
    finally:
        await store.close()
    warn(read.warnings)
    return status_data(read.jobs, read.status, time.time())
