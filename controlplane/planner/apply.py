"""Plan files and the guarded apply: a plan is a diff plus the revision it was computed at.

    plan_from_etcd: read_live at R ─▶ assemble_snapshot ─▶ compute_plan ─▶ PlanFile(R, guards, actions)
    apply_plan(PlanFile): ONE txn  ─ if   every guard holds (+ the caller's fence, e.g. leadership)
                                   ─ then put desired/<node>/<id> for START, delete it for STOP,
                                          put plans/current (PlanRecord)
                                   ─ else nothing is written: StalePlan names what changed

Which keys guard a plan (the choice, and why). A guard must fail when applying would be *wrong*,
and should not fail on churn that cannot make it wrong, or a busy pool never converges:

* ``plans/current``, by mod revision (absent = 0): every apply rewrites it, so a plan computed
  before another apply (a second `ctl apply`, the daemon) is rejected. This is what protects
  KEEP and STOP: the desired keys they name are exactly those read at R.
* ``desired/`` as a prefix, "nothing written after R": catches writers that bypass plans/current.
  (A prefix compare cannot see deletions; deletes come with a plans/current write, above.)
* ``models/`` as a prefix, "nothing written after R", plus each model with a START by mod
  revision (so a deleted model is caught): the plan's TP, memory fit and coverage come from
  the catalog it read. The catalog changes rarely, so being strict costs nothing.
* each node with a START, by mod revision: the GPU indices were chosen from that record's free
  list, draining flag and end time; any change (or the node leaving) may invalidate them.
  Nodes the plan only keeps or stops on are not guarded: a change there cannot make a KEEP or a
  STOP wrong (a vanished node's desired keys are cleaned up by the next plan).
* ``instances/`` is not guarded. Instance records change on every state transition (STARTING →
  READY, FAILED and restarted), on every lease re-grant, and while drains run; guarding them would
  reject most plans during convergence. The plan does not read placement from them: current
  replicas come from desired/, free GPUs from the node records (guarded where it matters).
* ``demand/`` is not guarded: it moves every few seconds and affects optimality, not safety.

A START always gets a fresh assignment id; KEEP and STOP carry the id read from desired/, which
is what the agent matches on, so a kept replica's key is never rewritten (no restart). KEEP keys
need no put: they existed at R and the guards above ensure they still do.

etcd refuses transactions with more than ``--max-txn-ops`` (default 128) compares or operations;
``apply_plan`` checks first and says so (cap changes with ``ctl planner run --max-churn``).
The planner daemon never sends such a plan: ``fit_transaction`` trims a plan file to one
transaction (STOPs first, and among them the ones the caller names first; no START while any
STOP is deferred, because a START may need a STOP's GPUs) and the rest waits for later rounds.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.keys import Keys
from controlplane.leader import Fence
from controlplane.pb import Assignment, PlanAction, PlanRecord
from controlplane.planner.diff import ActionKind, Plan
from controlplane.planner.live import Assembly, ClusterConfig, LiveRecords, assemble_snapshot, read_live
from controlplane.planner.snapshot import Snapshot
from controlplane.store import Cmp, EtcdStore, Op

PLAN_FORMAT: Final = "modelpool-plan/v1"

#: etcd's default --max-txn-ops.
MAX_TXN_OPS = 128


class ApplyError(Exception):
    """A plan cannot be applied; the message says why."""


class PlanFileError(ApplyError):
    """The plan file cannot be read, is invalid, or cannot be applied (e.g. made from a snapshot file)."""


class StalePlan(ApplyError):
    """Something the plan read changed before it was applied; nothing was written."""

    def __init__(self, message: str, changed: Sequence[str]) -> None:
        super().__init__(message)
        self.changed = tuple(changed)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlannedAction(_Model):
    """One action of a plan file; ``assignment_id`` is the desired key's last segment."""

    kind: ActionKind
    node_id: str
    model: str
    tp: int
    gpu_type: str = ""
    gpu_indices: tuple[int, ...]
    assignment_id: str


class Guard(_Model):
    """A compare the apply transaction makes.

    ``prefix = false``: the key's mod revision must still be ``mod_revision`` (0 = absent).
    ``prefix = true``: no key under ``key`` may have been written after ``mod_revision``.
    """

    key: str
    mod_revision: int = Field(ge=0)
    prefix: bool = False
    what: str

    def cmp(self) -> Cmp:
        """The etcd compare for this guard."""
        if self.prefix:
            return Cmp.mod_revision(self.key, self.mod_revision + 1, "<", prefix=True)
        return Cmp.mod_revision(self.key, self.mod_revision)


class PrefixRead(_Model):
    """What the plan read under one prefix: how many keys and the newest mod revision among them."""

    keys: int
    max_mod_revision: int


class PlanFile(_Model):
    """A plan on disk (`ctl plan --out`), everything `ctl apply` needs."""

    format: Literal["modelpool-plan/v1"] = PLAN_FORMAT
    plan_id: str
    etcd_prefix: str = ""
    source: str = "etcd"
    computed_at_revision: int = Field(ge=0, description="0 = not computed from etcd (cannot be applied)")
    computed_unix: float
    read: dict[str, PrefixRead] = Field(default_factory=dict)
    guards: tuple[Guard, ...] = ()
    actions: tuple[PlannedAction, ...] = ()
    summary: dict[str, Any] = Field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def changes(self) -> tuple[PlannedAction, ...]:
        """START and STOP actions."""
        return tuple(a for a in self.actions if a.kind is not ActionKind.KEEP)

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PlanFile:
        """Read a plan file; PlanFileError names the problem."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise PlanFileError(f"{p}: not valid JSON: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            raise PlanFileError(f"{p}: {loc}: {first.get('msg')}") from None


@dataclass(frozen=True)
class LivePlan:
    """A plan computed from etcd, with what it was computed from."""

    plan: Plan
    plan_file: PlanFile
    assembly: Assembly
    records: LiveRecords


@dataclass(frozen=True)
class ApplyResult:
    """What an apply wrote."""

    revision: int
    started: int
    stopped: int
    kept: int


# -- building plan files (pure) ------------------------------------------------------------------


def new_assignment_id(model: str) -> str:
    """A fresh, readable, key-safe assignment id: ``<model slug>-<12 hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "m"
    return f"{slug}-{uuid.uuid4().hex[:12]}"


def make_plan_file(plan: Plan, *, keys: Keys, now: float, records: LiveRecords | None = None,
                   invalid: Sequence[Assignment] = (), warnings: Sequence[str] = (),
                   source: str = "etcd") -> PlanFile:
    """Turn a Plan into a plan file: assignment ids for STARTs, STOPs for invalid assignments,
    and (when computed from etcd) the guards described in the module docstring."""
    actions = [PlannedAction(kind=a.kind, node_id=a.node_id, model=a.model, tp=a.tp, gpu_type=a.gpu_type,
                             gpu_indices=a.gpu_indices,
                             assignment_id=a.replica_id if a.kind is not ActionKind.START or a.replica_id
                             else new_assignment_id(a.model))
               for a in plan.actions]
    actions += [PlannedAction(kind=ActionKind.STOP, node_id=a.node_id, model=a.model, tp=len(a.gpu_indices),
                              gpu_indices=tuple(a.gpu_indices), assignment_id=a.assignment_id) for a in invalid]
    missing = [a for a in actions if a.kind is not ActionKind.START and not a.assignment_id]
    if missing:
        raise PlanFileError(f"{len(missing)} KEEP/STOP action(s) without an assignment id "
                            f"(first: {missing[0].node_id} {missing[0].model})")
    summary = plan.summary()
    summary.pop("actions", None)
    summary["counts"] = dict(Counter(a.kind.value for a in actions))
    guards: list[Guard] = []
    read: dict[str, PrefixRead] = {}
    revision = 0
    if records is not None:
        revision = records.revision
        guards, read = _guards(keys, records, actions)
    return PlanFile(plan_id=uuid.uuid4().hex, etcd_prefix=keys.prefix, source=source,
                    computed_at_revision=revision, computed_unix=now, read=read, guards=tuple(guards),
                    actions=tuple(actions), summary=summary, warnings=tuple(warnings))


def _guards(keys: Keys, records: LiveRecords, actions: Sequence[PlannedAction]
            ) -> tuple[list[Guard], dict[str, PrefixRead]]:
    mods = records.mod_revisions
    rev = records.revision
    guards = [
        Guard(key=keys.current_plan, mod_revision=mods.get(keys.current_plan, 0), what="the current plan"),
        Guard(key=keys.desired, mod_revision=rev, prefix=True, what="desired assignments"),
        Guard(key=keys.models, mod_revision=rev, prefix=True, what="the model catalog"),
    ]
    starts = [a for a in actions if a.kind is ActionKind.START]
    for model in sorted({a.model for a in starts}):
        guards.append(Guard(key=keys.model(model), mod_revision=mods.get(keys.model(model), 0), what=f"model {model}"))
    for node in sorted({a.node_id for a in starts}):
        node_key = keys.node_key_of_ref(node)
        guards.append(Guard(key=node_key, mod_revision=mods.get(node_key, 0), what=f"node {node}"))
    read: dict[str, PrefixRead] = {}
    for name, prefix in (("tenants", keys.tenants), ("nodes", keys.nodes), ("instances", keys.instances),
                         ("desired", keys.desired), ("models", keys.models), ("demand", keys.demand)):
        revs = [r for k, r in mods.items() if k.startswith(prefix)]
        read[name] = PrefixRead(keys=len(revs), max_mod_revision=max(revs, default=0))
    read["plans/current"] = PrefixRead(keys=int(keys.current_plan in mods), max_mod_revision=mods.get(
        keys.current_plan, 0))
    return guards, read


def txn_size(pf: PlanFile, extra_compares: int = 0) -> tuple[int, int]:
    """(operations, compares) of applying ``pf``: one op per START/STOP plus the plan record."""
    return len(pf.changes) + 1, len(pf.guards) + extra_compares


def fit_transaction(pf: PlanFile, *, max_ops: int = MAX_TXN_OPS, extra_compares: int = 0,
                    first: Callable[[PlannedAction], bool] = lambda _: False) -> PlanFile:
    """``pf`` trimmed so that applying it is one etcd transaction of at most ``max_ops`` operations
    and compares (``extra_compares``: the caller's fence). Unchanged when it fits.

    STOPs go before STARTs, and STOPs for which ``first`` is true (forced: node gone, draining…)
    before the others. A deferred STOP stays a KEEP (its desired key is left alone this round);
    while any STOP is deferred no START is applied, since a START may reuse a STOP's GPUs. STARTs
    are taken in plan order while their model and node guards fit. Guards of dropped STARTs go.
    """
    ops, compares = txn_size(pf, extra_compares)
    if ops <= max_ops and compares <= max_ops:
        return pf
    keys = Keys(pf.etcd_prefix or "/modelpool")
    stops = sorted((a for a in pf.actions if a.kind is ActionKind.STOP), key=lambda a: not first(a))
    starts = [a for a in pf.actions if a.kind is ActionKind.START]
    base = [g for g in pf.guards if g.prefix or g.key == keys.current_plan]
    room = max_ops - 1
    kept_stops = {a.assignment_id for a in stops[:room]}
    kept_starts: list[PlannedAction] = []
    guard_keys: set[str] = set()
    if len(stops) <= room:
        by_key = {g.key: g for g in pf.guards}
        for a in starts:
            need = {k for k in (keys.model(a.model), keys.node_key_of_ref(a.node_id)) if k in by_key} - guard_keys
            if (len(kept_stops) + len(kept_starts) + 1 >= max_ops
                    or len(base) + len(guard_keys) + len(need) + extra_compares > max_ops):
                break
            kept_starts.append(a)
            guard_keys |= need
    kept_start_ids = {id(a) for a in kept_starts}
    actions: list[PlannedAction] = []
    for a in pf.actions:
        if a.kind is ActionKind.STOP and a.assignment_id not in kept_stops:
            actions.append(a.model_copy(update={"kind": ActionKind.KEEP}))
        elif a.kind is not ActionKind.START or id(a) in kept_start_ids:
            actions.append(a)
    guards = [*base, *(g for g in pf.guards if g.key in guard_keys)]
    deferred = len(pf.changes) - len(kept_stops) - len(kept_starts)
    summary = {**pf.summary, "counts": dict(Counter(a.kind.value for a in actions)), "deferred_changes": deferred}
    note = (f"{deferred} of {len(pf.changes)} changes deferred to later rounds: one etcd transaction holds at "
            f"most {max_ops} operations and compares")
    return pf.model_copy(update={"actions": tuple(actions), "guards": tuple(guards), "summary": summary,
                                 "warnings": (*pf.warnings, note)})


async def plan_from_etcd(store: EtcdStore, keys: Keys, cluster: ClusterConfig, now: float, *,
                         time_limit_s: float = 10.0, demand_override: Mapping[str, float] | None = None,
                         snapshot_hook: Callable[[Snapshot, Plan], Plan] | None = None) -> LivePlan:
    """Read the pool at one revision, plan (in a worker thread: the solver blocks), build the plan file.

    ``snapshot_hook(snapshot, plan) -> Plan`` may replace the plan before the file is built (the
    daemon caps churn there).
    """
    records = await read_live(store, keys)
    assembly = assemble_snapshot(records, cluster, demand_override=demand_override)
    from controlplane.planner.model import compute_plan  # loads PuLP: only when planning

    plan = await asyncio.to_thread(compute_plan, assembly.snapshot, now, time_limit_s=time_limit_s)
    if snapshot_hook is not None:
        plan = snapshot_hook(assembly.snapshot, plan)
    pf = make_plan_file(plan, keys=keys, now=now, records=records, invalid=assembly.invalid,
                        warnings=[*assembly.warnings, *plan.notes])
    return LivePlan(plan, pf, assembly, records)


def plan_from_snapshot(snapshot: Snapshot, keys: Keys, now: float, *, time_limit_s: float = 10.0,
                       source: str = "snapshot") -> tuple[Plan, PlanFile]:
    """Plan a snapshot file (replay); the plan file has revision 0 and cannot be applied."""
    from controlplane.planner.model import compute_plan  # loads PuLP: only when planning

    plan = compute_plan(snapshot, now, time_limit_s=time_limit_s)
    return plan, make_plan_file(plan, keys=keys, now=now, warnings=plan.notes, source=source)


# -- applying ------------------------------------------------------------------------------------


def plan_record(pf: PlanFile, applied_by: str, now_ms: int, applied_at_revision: int = 0) -> PlanRecord:
    """The PlanRecord stored at plans/current for a plan file."""
    kinds = {ActionKind.START: PlanAction.START, ActionKind.STOP: PlanAction.STOP, ActionKind.KEEP: PlanAction.KEEP}
    return PlanRecord(
        plan_id=pf.plan_id, computed_at_revision=pf.computed_at_revision, applied_at_revision=applied_at_revision,
        applied_unix_ms=now_ms, applied_by=applied_by,
        actions=[PlanAction(kind=kinds[a.kind], assignment=assignment_of(a, pf.plan_id)) for a in pf.actions],
        cost_per_hour=float(pf.summary.get("cost_per_hour", 0.0)),
        summary_json=json.dumps(pf.summary, sort_keys=True),
    )


def assignment_of(a: PlannedAction, plan_id: str) -> Assignment:
    """The desired record for an action (engine left empty: the catalog's engine applies)."""
    return Assignment(assignment_id=a.assignment_id, node_id=a.node_id, model=a.model,
                      gpu_indices=list(a.gpu_indices), tensor_parallel=a.tp, plan_id=plan_id)


async def apply_plan(store: EtcdStore, keys: Keys, pf: PlanFile, applied_by: str, *,
                     fence: Fence | None = None, now_ms: int | None = None) -> ApplyResult:
    """Write a plan in one guarded transaction (see the module docstring); StalePlan when it is stale."""
    if pf.computed_at_revision <= 0:
        raise PlanFileError(f"plan {pf.plan_id} was computed from {pf.source}, not from etcd; it cannot be "
                            "applied (run `ctl plan` against etcd, or `ctl apply --auto-approve`)")
    if pf.etcd_prefix and pf.etcd_prefix != keys.prefix:
        raise PlanFileError(f"plan {pf.plan_id} was computed for prefix {pf.etcd_prefix!r}, not {keys.prefix!r}")
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    compares = [g.cmp() for g in pf.guards] + (fence.cmps() if fence else [])
    ops: list[Op] = []
    for a in pf.actions:
        if a.kind is ActionKind.START:
            ops.append(Op.put(keys.assignment(a.node_id, a.assignment_id),
                              assignment_of(a, pf.plan_id).SerializeToString()))
        elif a.kind is ActionKind.STOP:
            ops.append(Op.delete(keys.assignment(a.node_id, a.assignment_id)))
    ops.append(Op.put(keys.current_plan, plan_record(pf, applied_by, now_ms).SerializeToString()))
    if len(ops) > MAX_TXN_OPS or len(compares) > MAX_TXN_OPS:
        raise ApplyError(f"plan {pf.plan_id} needs {len(ops)} operations and {len(compares)} compares in one "
                         f"transaction; etcd allows {MAX_TXN_OPS} by default (raise etcd's --max-txn-ops, or cap "
                         "changes per round with `ctl planner run --max-churn`)")
    ok, rev = await store.txn(compares, ops)
    if not ok:
        changed = await describe_changes(store, pf.guards, fence)
        raise StalePlan(f"plan {pf.plan_id} (computed at revision {pf.computed_at_revision}) is stale, nothing "
                        f"was written: {'; '.join(changed) or 'a guard failed'} (revision now {rev}); plan again",
                        changed)
    # Record the revision the plan landed at; guarded so it only ever touches our own record.
    record = plan_record(pf, applied_by, now_ms, applied_at_revision=rev)
    await store.txn([Cmp.mod_revision(keys.current_plan, rev)], [Op.put(keys.current_plan, record.SerializeToString())])
    counts = Counter(a.kind for a in pf.actions)
    return ApplyResult(rev, counts[ActionKind.START], counts[ActionKind.STOP], counts[ActionKind.KEEP])


async def describe_changes(store: EtcdStore, guards: Sequence[Guard], fence: Fence | None = None) -> list[str]:
    """Human descriptions of the guards (and fence) that no longer hold, re-read from etcd now."""
    out: list[str] = []
    if fence is not None:
        kv = await store.get(fence.key)
        if kv is None or kv.create_revision != fence.create_revision or kv.value != fence.value:
            out.append(f"leadership lost ({fence.key} is now held by "
                       f"{kv.value.decode(errors='replace') if kv else 'nobody'})")
    for g in guards:
        if g.prefix:
            kvs, _ = await store.list_prefix(g.key)
            newer = [kv.key[len(g.key):] for kv in kvs if kv.mod_revision > g.mod_revision]
            if newer:
                out.append(f"{g.what}: {len(newer)} key(s) written after revision {g.mod_revision} "
                           f"({', '.join(newer[:3])}{', ...' if len(newer) > 3 else ''})")
            continue
        kv = await store.get(g.key)
        now_rev = kv.mod_revision if kv else 0
        if now_rev == g.mod_revision:
            continue
        if kv is None:
            out.append(f"{g.what} was deleted")
        elif g.mod_revision == 0:
            out.append(f"{g.what} was created (revision {now_rev})")
        else:
            out.append(f"{g.what} changed (revision {g.mod_revision} -> {now_rev})")
    return out

