"""`ctl planner run`: a leader-elected loop that plans and applies, and a pure churn limiter.

    LeaseSession (TTL) ──▶ campaign: txn[leader key absent] put(identity, lease) ──▶ Fence(create_rev, identity)
          │ lost ──▶ fence dropped                                                  │
          ▼                                                                         ▼
    every interval: plan_from_etcd ─▶ limit_churn ─▶ fit_transaction ─▶ apply_plan(fence) ─▶ sleep

The loop is a supervised periodic loop (controlplane/loops.py): any exception is a failed step,
logged and retried with backoff; nothing ends it but `stop`.

One etcd transaction holds at most ``--max-txn-ops`` (128 by default) operations and as many
compares. A plan larger than that would fail every round forever, so each round applies what
fits: the churn cap is lowered to what one transaction can hold (forced STOPs count against it
first), and ``fit_transaction`` trims the plan file as the last guarantee (STOPs first, forced
ones first; no START while any STOP waits, since a START may reuse a STOP's GPUs). The rest
follows in the next rounds: the plan is recomputed from what etcd then holds.

A leader that loses its lease or its key does not campaign again for one lease TTL, so a
standby takes over instead of the stalled process winning back at once. Winning once does not
make a leader safe (controlplane/leader.py, shared with `ctl harvest run`): every apply also
compares the leader key's create revision and value with ours, so a deposed leader's apply fails
(StalePlan naming "leadership lost") and it goes back to campaigning. Stopping revokes the
lease, which deletes the leader key at once.

Churn cap (``max_churn``): at most that many optional START+STOP actions per round. STOPs the
planner would make anyway (node gone or draining, model removed, replica no longer fits) are
always included and not counted: keeping those is never an option. The optional changes are
grouped into *moves*: changes on one node whose GPU sets overlap (a START that reuses the GPUs
of a STOP needs that STOP). Moves are chosen greedily by how much they lower the plan objective
(cost + unmet-demand, churn and min-replica penalties, the same formula the MILP minimises),
each evaluated on top of the moves already chosen (lazy greedy: a move's gain only shrinks as
others are chosen, so a re-evaluated move that still beats every stale estimate is the best).
Moves that would exceed the budget, or that do not lower the objective, are skipped. The result
is rebuilt with `build_plan`, so it is a consistent plan with its own cost and coverage.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import structlog

from controlplane.keys import Keys
from controlplane.leader import Fence, Leadership, wait_lease
from controlplane.loops import Backoff, Supervisor
from controlplane.planner.apply import (
    MAX_TXN_OPS,
    StalePlan,
    apply_plan,
    fit_transaction,
    plan_from_etcd,
)
from controlplane.planner.diff import Action, ActionKind, Plan, PlanningError, ReplicaKey, build_plan, keepable
from controlplane.planner.live import ClusterConfig
from controlplane.planner.snapshot import RunningReplica, Snapshot
from controlplane.store import EtcdStore, LeaseSession, StoreError

log = structlog.get_logger(__name__)


# -- churn limiter (pure) --------------------------------------------------------------------------


def _moves(changes: Sequence[Action]) -> list[list[Action]]:
    """Group changes on one node whose GPU sets overlap (transitively)."""
    parent = list(range(len(changes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_node: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(changes):
        by_node[a.node_id].append(i)
    for idx in by_node.values():
        for x in idx:
            for y in idx:
                if x < y and set(changes[x].gpu_indices) & set(changes[y].gpu_indices):
                    parent[find(x)] = find(y)
    groups: dict[int, list[Action]] = defaultdict(list)
    for i, a in enumerate(changes):
        groups[find(i)].append(a)
    return list(groups.values())


def forced_stops(snapshot: Snapshot, plan: Plan) -> set[str]:
    """Replica ids of the plan's STOPs that are not optional (node gone or draining, model removed,
    replica no longer fits): keeping those replicas is never an option."""
    nodes = {n.node_id: n for n in snapshot.nodes}
    reps: dict[str, RunningReplica] = {r.replica_id: r for r in snapshot.current if r.replica_id}
    out = set()
    for a in plan.changes:
        rep = reps.get(a.replica_id)
        if a.kind is ActionKind.STOP and (rep is None or not keepable(snapshot, nodes.get(a.node_id), rep)):
            out.add(a.replica_id)
    return out


#: compares of every apply besides the per-START guards: plans/current, desired/, models/, the fence (2)
BASE_COMPARES = 5


def txn_churn_cap(snapshot: Snapshot, plan: Plan, max_churn: int, max_ops: int = MAX_TXN_OPS) -> int | None:
    """The churn cap one transaction allows after the forced STOPs (None: the plan fits as it is;
    0: not even the forced STOPs fit, so only those go, capped, by ``fit_transaction``)."""
    forced = forced_stops(snapshot, plan)
    optional = len(plan.changes) - len(forced)
    # ops: every change + the plan record; compares: each START may add a model and a node guard
    room = min(max_ops - 1 - len(forced), (max_ops - BASE_COMPARES) // 2)
    if len(plan.changes) + 1 <= max_ops and BASE_COMPARES + 2 * optional <= max_ops and (
            max_churn <= 0 or optional <= max_churn):
        return None
    cap = max(0, room)
    return min(cap, max_churn) if max_churn > 0 else cap


def limit_churn(snapshot: Snapshot, now: float, plan: Plan, max_churn: int) -> Plan:
    """`plan` with at most `max_churn` optional changes, the most valuable first (module docstring)."""
    forced_ids = forced_stops(snapshot, plan)

    def forced(a: Action) -> bool:
        return a.kind is ActionKind.STOP and a.replica_id in forced_ids

    optional = [a for a in plan.changes if not forced(a)]
    if max_churn <= 0 or len(optional) <= max_churn:
        return plan
    base: dict[str, Counter[ReplicaKey]] = defaultdict(Counter)
    for a in plan.actions:
        if a.kind is ActionKind.KEEP or (a.kind is ActionKind.STOP and not forced(a)):
            base[a.node_id][(a.model, a.tp, a.gpu_type)] += 1

    def with_moves(moves: Sequence[Sequence[Action]]) -> dict[str, Counter[ReplicaKey]]:
        out = {n: Counter(c) for n, c in base.items()}
        for move in moves:
            for a in move:
                out.setdefault(a.node_id, Counter())[(a.model, a.tp, a.gpu_type)] += (
                    1 if a.kind is ActionKind.START else -1)
        return out

    def evaluate(moves: Sequence[Sequence[Action]]) -> Plan | None:
        try:
            p = build_plan(snapshot, now, with_moves(moves), planner=plan.planner, status=plan.status,
                           solve_time_s=plan.solve_time_s, notes=plan.notes, mip_gap=plan.mip_gap)
        except PlanningError:
            return None
        return p

    chosen: list[list[Action]] = []
    current = evaluate(chosen)
    if current is None:
        raise PlanningError("keeping every running replica does not fit: cannot cap churn")
    cost_cap = max(snapshot.budget_per_hour, current.cost_per_hour) if snapshot.budget_per_hour > 0 else None
    moves = _moves(optional)
    heap: list[tuple[float, int]] = []
    for i, move in enumerate(moves):
        p = evaluate([move])
        if p is not None:
            heapq.heappush(heap, (p.objective - current.objective, i))
    used = 0
    while heap and used < max_churn:
        _, i = heapq.heappop(heap)
        move = moves[i]
        if len(move) > max_churn - used:
            continue
        p = evaluate([*chosen, move])
        if p is None or (cost_cap is not None and p.cost_per_hour > cost_cap * (1 + 1e-9)):
            continue
        delta = p.objective - current.objective
        if heap and delta > heap[0][0] + 1e-9:
            heapq.heappush(heap, (delta, i))  # its estimate was stale; re-rank
            continue
        if delta >= -1e-9:
            break
        chosen.append(move)
        current = p
        used += len(move)
    return replace(current, notes=(*current.notes, f"churn capped at {max_churn}: {used} of {len(optional)} "
                                   "optional changes applied this round"))


# -- the daemon ------------------------------------------------------------------------------------


@dataclass
class DaemonConfig:
    """What `ctl planner run` decided from its flags."""

    cluster: ClusterConfig
    identity: str
    interval_s: float = 30.0
    max_churn: int = 0
    time_limit_s: float = 5.0
    lease_ttl: int = 10
    demand_override: dict[str, float] | None = None
    max_backoff_s: float = 30.0


@dataclass
class DaemonStats:
    """Counters, for logs and tests."""

    rounds: int = 0
    applied: int = 0
    stale: int = 0
    errors: int = 0
    terms: int = 0                 # times this daemon became leader
    last_error: str = ""
    applied_plan_ids: list[str] = field(default_factory=list)


class PlannerDaemon:
    """Campaign for leadership; while leader, plan and apply every interval. Never dies on errors."""

    def __init__(self, store: EtcdStore, keys: Keys, config: DaemonConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        self.stats = DaemonStats()
        self._stop = asyncio.Event()
        self.leadership = Leadership(store, keys.planner_leader, config.identity, role="planner",
                                     holdoff_s=config.lease_ttl)
        self.session = LeaseSession(store, config.lease_ttl, on_lost=self._on_lost, name="planner")

    @property
    def fence(self) -> Fence | None:
        """The fence of our leadership term (None while not leading); see controlplane/leader.py."""
        return self.leadership.fence

    @property
    def is_leader(self) -> bool:
        """True while this daemon believes it holds the leader key (writes are fenced regardless)."""
        return self.leadership.is_leader

    def stop(self) -> None:
        """Ask `run` to return (it revokes the lease, so another planner takes over at once)."""
        self._stop.set()

    async def _on_lost(self) -> None:
        self.leadership.lost()

    async def campaign(self, lease_id: int) -> bool:
        """Put the leader key if absent, on our lease; True when we now lead."""
        ok = await self.leadership.campaign(lease_id)
        self.stats.terms = self.leadership.terms
        return ok

    async def still_leader(self) -> bool:
        """Re-read the leader key; drop leadership when it is no longer ours."""
        return await self.leadership.still_leader()

    def _cap(self, snapshot: Snapshot, now: float, plan: Plan) -> Plan:
        """The churn cap of the round: --max-churn, lowered to what one transaction holds."""
        cap = txn_churn_cap(snapshot, plan, self.config.max_churn)
        if cap is None or cap == 0:
            return plan  # fits; or only forced STOPs fit: fit_transaction takes those
        try:
            return limit_churn(snapshot, now, plan, cap)
        except PlanningError as exc:  # cannot rank moves: fit_transaction still keeps the apply valid
            log.warning("cannot cap churn; trimming the plan to one transaction instead", error=str(exc))
            return plan

    async def round(self) -> None:
        """One planning round as leader: plan, cap churn, fit one transaction, apply fenced by leadership."""
        cfg = self.config
        now = self.clock()
        self.stats.rounds += 1
        live = await plan_from_etcd(self.store, self.keys, cfg.cluster, now, time_limit_s=cfg.time_limit_s,
                                    demand_override=cfg.demand_override,
                                    snapshot_hook=lambda s, p: self._cap(s, now, p))
        if not live.plan_file.changes:
            log.debug("plan has no changes", revision=live.plan_file.computed_at_revision)
            return
        if self.fence is None:
            return
        forced = forced_stops(live.assembly.snapshot, live.plan) | {a.assignment_id for a in live.assembly.invalid}
        pf = fit_transaction(live.plan_file, extra_compares=len(self.fence.cmps()),
                             first=lambda a: a.assignment_id in forced)
        result = await apply_plan(self.store, self.keys, pf, cfg.identity, fence=self.fence)
        self.stats.applied += 1
        self.stats.applied_plan_ids.append(pf.plan_id)
        log.info("plan applied", plan=pf.plan_id, revision=result.revision, started=result.started,
                 stopped=result.stopped, kept=result.kept, cost_per_hour=pf.summary.get("cost_per_hour"),
                 solver=pf.summary.get("status"), notes=list(pf.warnings))

    async def step(self) -> float | None:
        """One pass of the loop: campaign while follower, plan while leader. Returns the next delay."""
        cfg = self.config
        try:
            lease = await self._wait_lease()
            if lease == 0:
                return 0.0   # _wait_lease waited a second already
            if self.fence is None and (wait := self.leadership.holdoff_left()) > 0:
                return min(wait, cfg.lease_ttl / 3)
            if self.fence is None and not await self.campaign(lease):
                return min(cfg.interval_s, cfg.lease_ttl / 3)
            if await self.still_leader():
                await self.round()
            return None
        except StalePlan as exc:
            self.stats.stale += 1
            log.info("plan was stale; replanning", reason=str(exc))
            if not await self._safe_still_leader():
                return 0.0
            raise   # the runner retries after a (short, jittered) backoff
        except Exception as exc:  # the runner logs it and backs off; the stats say it happened
            self.stats.errors += 1
            self.stats.last_error = str(exc) or type(exc).__name__
            raise

    async def run(self) -> None:
        """Until `stop`: the supervised loop ``planner`` (campaign, plan, apply); never ends on errors."""
        cfg = self.config
        self.session.start()
        try:
            async with Supervisor() as loops:
                loops.periodic("planner", self.step, interval_s=cfg.interval_s,
                               backoff=Backoff(base_s=0.5, max_s=cfg.max_backoff_s))
                await self._stop.wait()
        finally:
            self.leadership.fence = None
            await self.session.close(revoke=True)

    async def _wait_lease(self) -> int:
        return await wait_lease(self.session)

    async def _safe_still_leader(self) -> bool:
        try:
            return await self.still_leader()
        except StoreError:
            return False
