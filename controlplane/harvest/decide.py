"""`decide`: one harvest round as a pure function — pool, Slurm, job records, settings, now in;
a `HarvestPlan` of submits, drains and cancels (each with its reason) and record changes out.

    records ──┬─ reconcile each with what Slurm and the pool say (state machine below)
    Slurm ────┤      ENDED + out of the 24 h window ──▶ delete the record
    pool ─────┘
              ├─ budget: used (actual running time, 24 h) + reserved (time limits of active jobs)
              └─ acquire (acquire.py): idle Slurm GPUs as obtainable capacity next to the pool's,
                 under the GPU-hours left, --max-jobs and the idle GPUs per node ──▶ submits

Job states (``HarvestJobState``)::

    PENDING ──Slurm starts it──▶ RUNNING ──GPUs idle ≥ --idle-release-after──▶ RELEASING (node drained)
       │                            │  └─agent never joined (--join-timeout)──┘     │ no engine left, or
       │ pending > --pending-timeout└─budget spent (safety net)──────────────────┘  │ --drain-timeout
       └──────────────────────────────▶ CANCELLED (scancel) ◀───────────────────────┘
    any ──Slurm no longer runs it (cancelled, time limit, preempted, failed)──▶ ENDED ──24 h──▶ deleted

"Idle" is the issue's rule: the node's GPUs carry no desired assignment. A job Slurm lists with
our job name but without a record (the harvester died between sbatch and the record write) is
adopted. Everything is decided from the arguments: the same inputs give the same plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from controlplane.harvest.acquire import Acquisition, acquire, obtainable_capacity, with_in_flight
from controlplane.harvest.model import (
    ACTIVE,
    Budget,
    Cancel,
    Drain,
    HarvestPlan,
    HarvestSettings,
    PoolView,
    SlurmView,
    budget_of,
    reserved_hours,
)
from controlplane.harvest.slurm import RUNNING_STATES, SlurmJobInfo
from controlplane.pb import HarvestJob, HarvestJobState

S = HarvestJobState
#: (snapshot, capacity, settings, now, *, max_new_jobs, gpu_hours_left, time_limit_s) -> Acquisition
Acquirer = Callable[..., Acquisition]


def decide(pool: PoolView, slurm: SlurmView, records: Mapping[str, HarvestJob], settings: HarvestSettings,
           now: float, *, time_limit_s: float = 5.0, acquirer: Acquirer = acquire) -> HarvestPlan:
    """One round's plan (module docstring). ``time_limit_s`` bounds the acquisition MILP;
    ``acquirer`` chooses the acquisitions (the one MILP; bench/harvest_sim.py swaps in a baseline)."""
    now_ms = int(now * 1000)
    plan = HarvestPlan()
    jobs: dict[str, HarvestJob] = {}
    for job_id, rec in sorted(records.items()):
        job = HarvestJob()
        job.CopyFrom(rec)
        _reconcile(job, slurm.jobs.get(job_id), pool, settings, now_ms, plan)
        if job.state == S.HARVEST_ENDED and job.ended_unix_ms < now_ms - 86_400_000:
            plan.deletes.append(job_id)
            continue
        jobs[job_id] = job
        if job.SerializeToString(deterministic=True) != rec.SerializeToString(deterministic=True):
            job.updated_unix_ms = now_ms
            plan.records[job_id] = job
    for job_id, info in sorted(slurm.jobs.items()):
        if job_id not in records and info.active:
            jobs[job_id] = plan.records[job_id] = _adopt(info, settings, pool, now_ms)
            plan.notes.append(f"adopted job {job_id}: Slurm lists it under our job name but etcd had no record")
    budget = budget_of(jobs, settings.budget_gpu_hours_per_day, now_ms)
    plan.budget = budget
    plan.active_jobs = sum(1 for j in jobs.values() if j.state in ACTIVE)
    _budget_guard(jobs, budget, plan, now_ms)
    _acquire(pool, slurm, jobs, settings, budget, now, plan, time_limit_s, acquirer)
    return plan


def _reconcile(job: HarvestJob, info: SlurmJobInfo | None, pool: PoolView, st: HarvestSettings, now_ms: int,
               plan: HarvestPlan) -> None:
    """Advance one job's state from what Slurm and the pool say; add drains and cancels to ``plan``."""
    if job.state == S.HARVEST_ENDED:
        if job.node_id and job.node_id in pool.drained_by_us:
            plan.clear_controls.append(job.node_id)
        return
    if info is not None:
        job.slurm_state = info.state
    node_id = pool.node_by_job.get(job.job_id, "")
    if node_id:
        job.node_id = node_id
    if info is None or not info.active:
        _ended(job, info, now_ms)
        if job.node_id and job.node_id in pool.drained_by_us:
            plan.clear_controls.append(job.node_id)
        return
    running = info.state in RUNNING_STATES
    if running and info.start_unix:
        start_ms = info.start_unix * 1000
        if job.started_unix_ms and job.started_unix_ms != start_ms:  # requeued and started again
            job.gpu_hours += max(0, (job.ended_unix_ms or start_ms) - job.started_unix_ms) / 3.6e6 * job.gpu_count
        job.started_unix_ms = start_ms
        job.ended_unix_ms = 0
    elif not running and job.started_unix_ms:  # requeued (preempted with PreemptMode=REQUEUE): bank the run
        job.gpu_hours += max(0, now_ms - job.started_unix_ms) / 3.6e6 * job.gpu_count
        job.started_unix_ms = 0
        if job.state == S.HARVEST_RUNNING:
            _enter(job, S.HARVEST_PENDING, now_ms)
    since_s = (now_ms - job.state_since_unix_ms) / 1000
    if job.state == S.HARVEST_CANCELLED:
        if since_s >= st.drain_timeout_s:  # scancel did not take (controller busy?): send it again
            plan.cancels.append(Cancel(job.job_id, job.end_reason or "cancel again"))
            _enter(job, S.HARVEST_CANCELLED, now_ms)
        return
    if job.state == S.HARVEST_RELEASING:
        if not job.node_id or job.node_id not in pool.nodes_with_instances or since_s >= st.drain_timeout_s:
            _cancel(job, job.end_reason, now_ms, plan)
        return
    if not running:
        # from the submission, or from a requeue (which re-entered PENDING)
        waited = (now_ms - max(job.submitted_unix_ms, job.state_since_unix_ms)) / 1000
        if waited >= st.pending_timeout_s:
            _cancel(job, f"pending for {waited:.0f}s (> --pending-timeout {st.pending_timeout_s:g}s); "
                    f"Slurm reason: {info.reason}", now_ms, plan)
        return
    if job.state != S.HARVEST_RUNNING:
        _enter(job, S.HARVEST_RUNNING, now_ms)
    if not job.node_id:
        up_s = (now_ms - job.started_unix_ms) / 1000
        if up_s >= st.join_timeout_s:
            _cancel(job, f"its agent did not register within {st.join_timeout_s:g}s of the job start "
                    "(see the job's output file)", now_ms, plan)
        return
    if job.node_id in pool.busy_nodes:
        job.idle_since_unix_ms = 0
        return
    if not job.idle_since_unix_ms:
        job.idle_since_unix_ms = now_ms
    idle_s = (now_ms - job.idle_since_unix_ms) / 1000
    if idle_s >= st.idle_release_after_s:
        reason = f"its GPUs carried no assignment for {idle_s:.0f}s (--idle-release-after {st.idle_release_after_s:g}s)"
        _release(job, reason, now_ms, plan)


def _enter(job: HarvestJob, state: int, now_ms: int) -> None:
    job.state = state  # type: ignore[assignment]
    job.state_since_unix_ms = now_ms


def _release(job: HarvestJob, reason: str, now_ms: int, plan: HarvestPlan) -> None:
    """Drain the job's node (no new work for it), then cancel once its engines are gone."""
    job.end_reason = reason
    _enter(job, S.HARVEST_RELEASING, now_ms)
    plan.drains.append(Drain(job.job_id, job.node_id, reason))


def _cancel(job: HarvestJob, reason: str, now_ms: int, plan: HarvestPlan) -> None:
    job.end_reason = reason
    _enter(job, S.HARVEST_CANCELLED, now_ms)
    plan.cancels.append(Cancel(job.job_id, reason))


def _ended(job: HarvestJob, info: SlurmJobInfo | None, now_ms: int) -> None:
    """Slurm no longer runs the job. Its end: Slurm's, when it still shows the job; else now (an
    over-estimate by at most one round, never an under-estimate of GPU-hours)."""
    if info is not None and info.start_unix and not job.started_unix_ms:
        job.started_unix_ms = info.start_unix * 1000
    end_ms = info.end_unix * 1000 if info is not None and info.end_unix else now_ms
    job.ended_unix_ms = max(end_ms, job.started_unix_ms) if job.started_unix_ms else 0
    why = {"PREEMPTED": "preempted by Slurm", "TIMEOUT": "reached its time limit", "NODE_FAIL": "its node failed",
           "FAILED": "failed (see the job's output file)", "COMPLETED": "completed (its agent exited)",
           "OUT_OF_MEMORY": "ran out of memory"}
    if not job.end_reason or job.state not in (S.HARVEST_RELEASING, S.HARVEST_CANCELLED):
        job.end_reason = why.get(info.state, f"ended in Slurm: {info.state}") if info else "left Slurm's queue"
    if not job.ended_unix_ms:
        job.ended_unix_ms = now_ms  # never started: nothing ran, but the record still leaves after the window
    _enter(job, S.HARVEST_ENDED, now_ms)


def _adopt(info: SlurmJobInfo, st: HarvestSettings, pool: PoolView, now_ms: int) -> HarvestJob:
    """A record for a job of ours that Slurm runs but etcd does not know."""
    slurm_type, count = next(iter(info.gpus.items()), ("", 0))
    job = HarvestJob(job_id=info.job_id, partition=info.partition, slurm_gres_type=slurm_type,
                     gpu_type=st.gres_types.get(slurm_type, ""), gpu_count=count,
                     reason="adopted: found in Slurm under the harvester's job name without a record",
                     submitted_unix_ms=now_ms, time_limit_s=info.time_limit_s or st.time_limit_s,
                     slurm_state=info.state, updated_unix_ms=now_ms, state_since_unix_ms=now_ms,
                     node_id=pool.node_by_job.get(info.job_id, ""))
    running = info.state in RUNNING_STATES
    job.state = S.HARVEST_RUNNING if running else S.HARVEST_PENDING
    if running and info.start_unix:
        job.started_unix_ms = info.start_unix * 1000
    return job


def _budget_guard(jobs: dict[str, HarvestJob], budget: Budget, plan: HarvestPlan, now_ms: int) -> None:
    """Admission keeps the budget (model.py); should it still be spent (the limit lowered on a
    restart), running jobs are released, most reserved time first, until what is left fits."""
    if budget.limit <= 0 or budget.used + budget.reserved <= budget.limit * (1 + 1e-9):
        return
    over = budget.used + budget.reserved - budget.limit
    live = [j for j in jobs.values() if j.state in (S.HARVEST_RUNNING, S.HARVEST_PENDING)]
    for job in sorted(live, key=lambda j: -reserved_hours(j, now_ms)):
        if over <= 0:
            break
        over -= reserved_hours(job, now_ms)
        reason = (f"budget: {budget.used:.2f} GPU-h used + {budget.reserved:.2f} reserved exceed "
                  f"--budget-gpu-hours-per-day {budget.limit:g}")
        if job.state == S.HARVEST_RUNNING and job.node_id:
            _release(job, reason, now_ms, plan)
        else:
            _cancel(job, reason, now_ms, plan)
        plan.records[job.job_id] = job


def _acquire(pool: PoolView, slurm: SlurmView, jobs: dict[str, HarvestJob], st: HarvestSettings, budget: Budget,
             now: float, plan: HarvestPlan, time_limit_s: float, acquirer: Acquirer) -> None:
    snapshot = with_in_flight(pool.snapshot, jobs.values(), st, now)
    capacity = obtainable_capacity(slurm.nodes, jobs.values(), st, snapshot)
    max_jobs = max(0, st.max_jobs - plan.active_jobs)
    gpu_hours_left = budget.left
    result = acquirer(snapshot, capacity, st, now, max_new_jobs=max_jobs, gpu_hours_left=gpu_hours_left,
                      time_limit_s=time_limit_s)
    plan.submits.extend(result.submits)
    plan.unmet_rps.update(result.unmet_rps)
    plan.notes.extend(result.notes)
    if budget.limit > 0 and result.blocked_by_budget:
        plan.notes.append(
            f"budget exhausted: {budget.used:.2f} GPU-h used + {budget.reserved:.2f} reserved of "
            f"{budget.limit:g} per 24 h; {gpu_hours_left:.2f} left, a {st.time_limit_h:g} h job needs "
            f"{st.time_limit_h:g} GPU-h per GPU; no new job")
    if result.blocked_by_jobs:
        plan.notes.append(f"--max-jobs {st.max_jobs} reached ({plan.active_jobs} active); no new job")
