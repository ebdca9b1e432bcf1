"""fit_transaction: every plan file the daemon applies fits one etcd transaction, safely."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.keys import Keys
from controlplane.planner.apply import Guard, PlanFile, PlannedAction, fit_transaction, txn_size
from controlplane.planner.diff import ActionKind

KEYS = Keys("/p")


def plan_file(kinds: list[tuple[ActionKind, int, int]]) -> PlanFile:
    """Actions of (kind, node number, model number), with the guards make_plan_file would write."""
    actions = tuple(PlannedAction(kind=k, node_id=f"n{n}", model=f"m{m}", tp=1, gpu_indices=(0,),
                                  assignment_id=f"a{i}") for i, (k, n, m) in enumerate(kinds))
    starts = [a for a in actions if a.kind is ActionKind.START]
    guards = [Guard(key=KEYS.current_plan, mod_revision=3, what="the current plan"),
              Guard(key=KEYS.desired, mod_revision=9, prefix=True, what="desired assignments"),
              Guard(key=KEYS.models, mod_revision=9, prefix=True, what="the model catalog")]
    guards += [Guard(key=KEYS.model(m), mod_revision=2, what=f"model {m}") for m in sorted({a.model for a in starts})]
    guards += [Guard(key=KEYS.node(n), mod_revision=2, what=f"node {n}") for n in sorted({a.node_id for a in starts})]
    return PlanFile(plan_id="p", etcd_prefix="/p", computed_at_revision=9, computed_unix=0.0, actions=actions,
                    guards=tuple(guards))


actions = st.lists(st.tuples(st.sampled_from([ActionKind.START, ActionKind.STOP, ActionKind.KEEP]),
                             st.integers(0, 80), st.integers(0, 5)), max_size=400)


@settings(max_examples=200, deadline=None)
@given(kinds=actions, max_ops=st.integers(8, 200), forced_mod=st.integers(1, 4))
def test_the_result_fits_and_never_starts_while_a_stop_waits(kinds: list[tuple[ActionKind, int, int]], max_ops: int,
                                                             forced_mod: int) -> None:
    pf = plan_file(kinds)

    def forced(a: PlannedAction) -> bool:
        return int(a.assignment_id[1:]) % forced_mod == 0

    out = fit_transaction(pf, max_ops=max_ops, extra_compares=2, first=forced)
    ops, compares = txn_size(out, 2)
    assert ops <= max_ops and compares <= max_ops
    before = {a.assignment_id: a for a in pf.actions}
    after = {a.assignment_id: a for a in out.actions}
    assert set(after) <= set(before)
    stops_before = [a for a in pf.actions if a.kind is ActionKind.STOP]
    kept_stops = {a.assignment_id for a in out.actions if a.kind is ActionKind.STOP}
    kept_starts = [a for a in out.actions if a.kind is ActionKind.START]
    # a deferred STOP stays a KEEP, and no START goes while one waits
    for a in stops_before:
        assert after[a.assignment_id].kind in (ActionKind.STOP, ActionKind.KEEP)
    if len(kept_stops) < len(stops_before):
        assert not kept_starts
        # forced STOPs first: a non-forced STOP is kept only when every forced one is
        if any(not forced(a) for a in stops_before if a.assignment_id in kept_stops):
            assert all(a.assignment_id in kept_stops for a in stops_before if forced(a))
    guard_keys = {g.key for g in out.guards}
    for a in kept_starts:
        assert KEYS.model(a.model) in guard_keys and KEYS.node(a.node_id) in guard_keys
    if txn_size(pf, 2)[0] <= max_ops and txn_size(pf, 2)[1] <= max_ops:
        assert out == pf
    else:
        assert out.changes, "every round makes progress"
        assert any("deferred" in w for w in out.warnings)
