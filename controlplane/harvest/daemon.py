"""`ctl harvest run`: a leader-elected, fenced loop that turns unmet demand into Slurm pool jobs
and gives idle ones back.

    LeaseSession ──▶ Leadership(harvest/leader) ──▶ Fence (controlplane/leader.py, as the planner)
    Supervisor.periodic("harvest", step, --interval)          (controlplane/loops.py: never dies)
      step: lease? ─ campaign / still leader? ─ round:
        Slurm: sinfo, scontrol -d show node, squeue  ── any fails: the round ends here (raise):
        │                                              nothing is decided, submitted or cancelled
        etcd: read_harvest at one revision ──▶ decide (pure) ──▶ execute:
            drains:  txn[fence] put control/nodes/<node> (drain) + the job record
            cancels: scancel, then txn[fence] put the job record
            submits: sbatch pool.sbatch --gres=gpu:TYPE:N …, then txn[fence] put the new record
            the rest: txn[fence] record updates, deletes, clearing our drains of ended jobs
        status: harvest/status on the leader's lease, rewritten only when it changed

Every etcd write is fenced by the leadership, so a deposed leader writes nothing. A leader that
loses leadership between an ``sbatch`` and its record write leaves a job without a record; the
next leader adopts it by its job name (decide.py). ``--dry-run`` decides and logs, and neither
runs sbatch/scancel nor writes to etcd.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.gpus import GpuDiscoveryError, parse_gpu_override
from controlplane.harvest.decide import decide
from controlplane.harvest.errors import SlurmCommandError
from controlplane.harvest.live import DRAINED_BY, pool_view, read_harvest
from controlplane.harvest.model import HarvestPlan, HarvestSettings, SlurmView, Submit
from controlplane.harvest.slurm import Slurm
from controlplane.keys import Keys
from controlplane.leader import Leadership, wait_lease
from controlplane.loops import EXPECTED_ERRORS, Backoff, Supervisor
from controlplane.pb import HarvestJob, HarvestJobState, HarvestStatus, NodeControl
from controlplane.planner.live import ClusterConfig
from controlplane.store import EtcdStore, LeaseSession, Op, StoreError

log = structlog.get_logger(__name__)
S = HarvestJobState

#: etcd's default --max-txn-ops is 128; leave room for the fence's compares.
TXN_CHUNK = 100


def job_name(prefix: str) -> str:
    """The Slurm job name of this pool's harvested jobs (a pool never adopts another's jobs)."""
    return f"modelpool-harvest-{hashlib.sha256(prefix.encode()).hexdigest()[:8]}"


@dataclass
class JobTemplate:
    """How a pool job is submitted."""

    script: Path                                  # ops/slurm/pool.sbatch
    etcd_endpoints: str                           # ETCD for the agent in the job
    etcd_prefix: str
    env: Mapping[str, str] = field(default_factory=dict)   # --sbatch-env KEY=VALUE
    declare_gpus: bool = False                    # GPUS=<n>x<type> (hosts without NVML)
    signal: str = "B:USR1@120"                    # --signal for the pre-end drain
    job_dir: Path | None = None                   # --chdir (where the job's output file goes)
    extra_args: tuple[str, ...] = ()

    def sbatch_args(self, submit: Submit, st: HarvestSettings) -> list[str]:
        """The sbatch options of one submission."""
        args = [f"--job-name={st.job_name}", f"--partition={submit.partition}",
                f"--gres=gpu:{submit.slurm_type}:{submit.gpus}", f"--time={max(1, st.time_limit_s // 60)}",
                f"--signal={self.signal}"]
        if self.job_dir is not None:
            args.append(f"--chdir={self.job_dir}")
        return [*args, *self.extra_args]

    def job_env(self, submit: Submit, memory_gib: float) -> dict[str, str]:
        """The job's environment on top of the submitter's (sbatch exports it)."""
        env = {"ETCD": self.etcd_endpoints, "ETCD_PREFIX": self.etcd_prefix, **self.env}
        if self.declare_gpus:
            env["GPUS"] = declared_gpus(submit.gpus, submit.gpu_type, memory_gib)
        return env


def declared_gpus(count: int, gpu_type: str, memory_gib: float) -> str:
    """``GPUS`` for the agent's --gpus: ``<n>x<TYPE>``, with ``:<mem>GB`` when the agent could not
    know the type's memory by its name."""
    plain = f"{count}x{gpu_type}"
    try:
        known = parse_gpu_override(plain)[0].memory_bytes / 2**30
    except GpuDiscoveryError:
        known = 0.0
    return plain if abs(known - memory_gib) < 1e-6 else f"{plain}:{memory_gib:g}GB"


@dataclass
class HarvestDaemonConfig:
    """What `ctl harvest run` decided from its flags."""

    settings: HarvestSettings
    cluster: ClusterConfig
    template: JobTemplate
    identity: str
    lease_ttl: int = 10
    solver_time_limit_s: float = 5.0
    dry_run: bool = False
    demand_override: Mapping[str, float] | None = None


@dataclass
class HarvestStats:
    """Counters, for logs and tests."""

    rounds: int = 0
    submitted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    errors: int = 0
    last_plan: HarvestPlan | None = None


class HarvestDaemon:
    """Campaign for harvest leadership; while leader, run a harvest round every interval."""

    def __init__(self, store: EtcdStore, keys: Keys, config: HarvestDaemonConfig, slurm: Slurm,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self.slurm = slurm
        self.clock = clock
        self.stats = HarvestStats()
        self.leadership = Leadership(store, keys.harvest_leader, config.identity, role="harvest",
                                     holdoff_s=config.lease_ttl)
        self.session = LeaseSession(store, config.lease_ttl, on_lost=self._on_lost, name="harvest")
        self._stop = asyncio.Event()
        self._status_written = b""
        self._last_error = ""

    async def _on_lost(self) -> None:
        self.leadership.lost()
        self._status_written = b""  # the status key died with the lease

    def stop(self) -> None:
        """Ask `run` to return; it revokes the lease (leadership and status go at once)."""
        self._stop.set()

    async def run(self) -> None:
        """Until `stop`: the supervised periodic step (never ends on an error)."""
        st = self.config.settings
        self.session.start()
        # Slurm failing is expected (a busy controller, an outage): one warning line, not a traceback
        supervisor = Supervisor(expected_errors=(*EXPECTED_ERRORS, SlurmCommandError))
        supervisor.periodic("harvest", self.step, interval_s=st.interval_s,
                            timeout_s=max(60.0, 3 * st.interval_s), backoff=Backoff(0.5, min(30.0, st.interval_s)))
        try:
            await self._stop.wait()
        finally:
            await supervisor.close()
            self.leadership.fence = None
            await self.session.close(revoke=True)

    async def step(self) -> float | None:
        """Campaign while follower, a round while leader; returns the delay to the next step."""
        st = self.config.settings
        lease = await wait_lease(self.session)
        if lease == 0:
            return min(st.interval_s, 1.0)
        if not self.leadership.is_leader:
            if (wait := self.leadership.holdoff_left()) > 0:  # deposed: let a standby take over first
                return min(wait, self.config.lease_ttl / 3)
            if not await self.leadership.campaign(lease):
                return min(st.interval_s, self.config.lease_ttl / 3)
        elif not await self.leadership.still_leader():
            return min(st.interval_s, self.config.lease_ttl / 3)
        try:
            await self.round()
        except Exception as exc:  # recorded for `ctl harvest status`, then re-raised to the loop runner
            self.stats.errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            await self._publish_failure(lease)
            raise  # the loop logs it and backs off
        self._last_error = ""
        return None

    # -- one round ---------------------------------------------------------------------------------

    async def round(self) -> HarvestPlan:
        """Read Slurm and etcd, decide, execute (module docstring)."""
        cfg, st = self.config, self.config.settings
        self.stats.rounds += 1
        await self.slurm.partitions()       # sinfo: the controller answers (fail the round if not)
        nodes = await self.slurm.nodes()
        jobs = await self.slurm.jobs(st.job_name)
        now = self.clock()
        read = await read_harvest(self.store, self.keys)
        view, warnings = pool_view(read, cfg.cluster, demand_override=cfg.demand_override)
        plan = decide(view, SlurmView(tuple(nodes), {j.job_id: j for j in jobs}), read.jobs, st, now,
                      time_limit_s=cfg.solver_time_limit_s)
        self.stats.last_plan = plan
        for w in warnings:
            log.debug("harvest read warning", warning=w)
        _log_plan(plan, dry_run=cfg.dry_run)
        if not cfg.dry_run:
            await self.execute(plan, now)
            await self._publish_status(plan, now)
        return plan

    async def execute(self, plan: HarvestPlan, now: float) -> None:
        """Carry the plan out; each etcd write fenced by the leadership."""
        now_ms = int(now * 1000)
        records = dict(plan.records)
        for drain in plan.drains:
            control = NodeControl(node_id=drain.node_id, drain=True, reason=f"harvest: {drain.reason}",
                                  requested_unix_ms=now_ms, requested_by=f"{DRAINED_BY} {self.config.identity}")
            ops = [Op.put(self.keys.node_control(drain.node_id), control.SerializeToString())]
            if drain.job_id in records:
                ops.append(self._put_job(records.pop(drain.job_id)))
            await self._fenced(ops)
            self.stats.drained.append(drain.job_id)
            log.info("harvest job releasing", job=drain.job_id, node=drain.node_id, reason=drain.reason)
        for cancel in plan.cancels:
            try:
                await self.slurm.cancel(cancel.job_id)
            except SlurmCommandError as exc:
                log.warning("harvest scancel failed; retried next round", job=cancel.job_id, error=str(exc))
                records.pop(cancel.job_id, None)  # keep the old state: the next round decides again
                continue
            self.stats.cancelled.append(cancel.job_id)
            log.info("harvest job cancelled", job=cancel.job_id, reason=cancel.reason)
            if cancel.job_id in records:
                await self._fenced([self._put_job(records.pop(cancel.job_id))])
        for submit in plan.submits:
            await self._submit(submit, now_ms)
        ops = [self._put_job(j) for j in records.values()]
        ops += [Op.delete(self.keys.harvest_job(job_id)) for job_id in plan.deletes]
        ops += [Op.delete(self.keys.node_control(node)) for node in plan.clear_controls]
        for i in range(0, len(ops), TXN_CHUNK):
            await self._fenced(ops[i:i + TXN_CHUNK])

    async def _submit(self, submit: Submit, now_ms: int) -> None:
        cfg, st = self.config, self.config.settings
        tpl = cfg.template
        memory = st.gpu_memory_gib.get(submit.gpu_type, 0.0)
        job_id = await self.slurm.submit(str(tpl.script), tpl.sbatch_args(submit, st), tpl.job_env(submit, memory))
        self.stats.submitted.append(job_id)
        log.info("harvest job submitted", job=job_id, partition=submit.partition, gres=submit.slurm_type,
                 gpus=submit.gpus, gpu_type=submit.gpu_type, models=list(submit.models), reason=submit.reason)
        job = HarvestJob(job_id=job_id, state=S.HARVEST_PENDING, partition=submit.partition,
                         slurm_gres_type=submit.slurm_type, gpu_type=submit.gpu_type, gpu_count=submit.gpus,
                         models=list(submit.models), reason=submit.reason, submitted_unix_ms=now_ms,
                         time_limit_s=st.time_limit_s, updated_unix_ms=now_ms, submitted_by=cfg.identity,
                         price_per_gpu_hour=submit.price_per_gpu_hour, slurm_state="PENDING",
                         state_since_unix_ms=now_ms)
        await self._fenced([self._put_job(job)])

    def _put_job(self, job: HarvestJob) -> Op:
        return Op.put(self.keys.harvest_job(job.job_id), job.SerializeToString())

    async def _fenced(self, ops: Sequence[Op]) -> None:
        fence = self.leadership.fence
        if fence is None or not ops:
            if ops:
                log.warning("not leader any more; harvest writes dropped", ops=len(ops))
            return
        ok, _ = await self.store.txn(fence.cmps(), ops)
        if not ok:
            log.warning("harvest leadership lost; writes dropped (a new leader adopts what Slurm runs)",
                        ops=len(ops))
            self.leadership.fence = None

    # -- status ------------------------------------------------------------------------------------

    def status_record(self, plan: HarvestPlan | None, now: float) -> HarvestStatus:
        """The status the leader publishes (budget figures rounded so it changes rarely)."""
        st = self.config.settings
        status = HarvestStatus(leader=self.config.identity, updated_unix_ms=int(now * 1000),
                               budget_gpu_hours_per_day=st.budget_gpu_hours_per_day, max_jobs=st.max_jobs,
                               partitions=list(st.partitions), last_error=self._last_error)
        if plan is not None:
            status.used_gpu_hours = round(plan.budget.used, 1)
            status.reserved_gpu_hours = round(plan.budget.reserved, 1)
            status.active_jobs = plan.active_jobs
            status.notes.extend(plan.notes)
            for model, rps in sorted(plan.unmet_rps.items()):
                status.unmet_rps[model] = round(rps, 2)
        return status

    async def _publish_status(self, plan: HarvestPlan | None, now: float) -> None:
        lease = self.session.lease_id
        fence = self.leadership.fence
        if not lease or fence is None:
            return
        status = self.status_record(plan, now)
        body = _without_time(status)
        if body == self._status_written:
            return
        ok, _ = await self.store.txn(fence.cmps(), [Op.put(self.keys.harvest_status, status.SerializeToString(),
                                                           lease=lease)])
        if ok:
            self._status_written = body

    async def _publish_failure(self, lease: int) -> None:
        try:
            await self._publish_status(self.stats.last_plan, self.clock())
        except StoreError as exc:  # reporting the failure must not hide it
            log.debug("harvest status not written", error=str(exc), lease=lease)


def _without_time(status: HarvestStatus) -> bytes:
    copy = HarvestStatus()
    copy.CopyFrom(status)
    copy.updated_unix_ms = 0
    return copy.SerializeToString(deterministic=True)


def _log_plan(plan: HarvestPlan, *, dry_run: bool) -> None:
    for s in plan.submits:
        log.info("harvest decision: submit", dry_run=dry_run, partition=s.partition, gres=s.slurm_type,
                 gpus=s.gpus, models=list(s.models), reason=s.reason)
    for c in plan.cancels:
        log.info("harvest decision: cancel", dry_run=dry_run, job=c.job_id, reason=c.reason)
    for d in plan.drains:
        log.info("harvest decision: release", dry_run=dry_run, job=d.job_id, node=d.node_id, reason=d.reason)
    for note in plan.notes:
        log.info("harvest note", note=note)
