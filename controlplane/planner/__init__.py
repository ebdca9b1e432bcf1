"""The placement planner: a pure function from a `Snapshot` to a `Plan`.

    from controlplane.planner import Snapshot, compute_plan
    plan = compute_plan(Snapshot.load("examples/snapshot-small.yaml"), now=time.time())

`compute_plan` is the MILP; `plan_single_best_type` and `plan_greedy` are baselines returning the
same `Plan` type. Nothing here touches etcd or the clock. See README.md in this package.
"""

from typing import TYPE_CHECKING, Any

from controlplane.planner.baselines import plan_greedy, plan_single_best_type
from controlplane.planner.diff import (
    Action,
    ActionKind,
    ModelCoverage,
    Placement,
    Plan,
    PlanningError,
    build_plan,
)
from controlplane.planner.snapshot import (
    GpuInfo,
    GpuTypeInfo,
    ModelInfo,
    NodeInfo,
    PlanWeights,
    RunningReplica,
    Snapshot,
    SnapshotError,
    ThroughputProfile,
    ThroughputTable,
    tp_options,
)

if TYPE_CHECKING:
    from controlplane.planner.model import compute_plan


def __getattr__(name: str) -> Any:
    # compute_plan loads PuLP and HiGHS (~50 ms): only when a plan is computed, not on every `ctl`.
    if name == "compute_plan":
        from controlplane.planner.model import compute_plan

        return compute_plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Action",
    "ActionKind",
    "GpuInfo",
    "GpuTypeInfo",
    "ModelCoverage",
    "ModelInfo",
    "NodeInfo",
    "Placement",
    "Plan",
    "PlanWeights",
    "PlanningError",
    "RunningReplica",
    "Snapshot",
    "SnapshotError",
    "ThroughputProfile",
    "ThroughputTable",
    "build_plan",
    "compute_plan",
    "plan_greedy",
    "plan_single_best_type",
    "tp_options",
]
