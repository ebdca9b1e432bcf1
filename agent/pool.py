"""Pool mode: converge this node's instances to the planner's ``desired/<node>/…`` assignments.

Level-triggered, like a Kubernetes controller: whatever happened before, each round compares
what is desired with what runs and acts on the difference. Watch events only wake the loop
early; a periodic resync repairs anything missed. The decision is a pure function (``diff``).

    watch desired/<node>/ + models/ ──▶ latest desired, catalog
                                         │ every change or resync_s
                                         ▼
                  diff(desired, running, catalog, gpus) ──▶ start [...] / stop [...] / problems
                                         │
               start: ManagedInstance(assignment) ── stop: drain(grace) in the background
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog
from google.protobuf.message import Message

from controlplane.keys import Keys, RecordDecodeError, decode, decode_segment
from controlplane.pb import Assignment, ModelSpec, NodeControl
from controlplane.store import Changes, EtcdStore, KeyValue, Resync, watch_prefix

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class RunningAssignment:
    """What the agent runs for one assignment (the fields that, when changed, mean restart)."""

    assignment_id: str
    model: str
    gpu_indices: tuple[int, ...]
    engine: str


@dataclass(frozen=True)
class PoolDiff:
    """One reconcile round's decision."""

    start: tuple[Assignment, ...]
    stop: tuple[str, ...]                    # assignment ids to drain
    problems: tuple[str, ...]                # desired assignments that cannot run (and why)

    @property
    def empty(self) -> bool:
        return not self.start and not self.stop


def wanted_form(a: Assignment, spec: ModelSpec | None, current: RunningAssignment | None = None) -> RunningAssignment:
    """How an assignment would run, for comparison with what runs (GPUs left to the agent match any)."""
    engine = a.engine or (spec.engine if spec else "") or "vllm"
    gpus = tuple(a.gpu_indices) if a.gpu_indices or current is None else current.gpu_indices
    return RunningAssignment(a.assignment_id, a.model, gpus, engine)


def diff(desired: Mapping[str, Assignment], running: Mapping[str, RunningAssignment],
         catalog: Mapping[str, ModelSpec], node_gpus: Collection[int], *, draining: bool = False) -> PoolDiff:
    """Start what is desired and not running (or running differently), stop what is not desired.

    GPUs are checked against the node's GPUs and against each other; an assignment that asks for a
    GPU still held by an instance being replaced waits for the next round (the stop frees it). An
    assignment without GPU indices gets the lowest free ones (``tensor_parallel`` of them, at least
    one); the started Assignment carries the concrete indices. A draining node starts nothing and
    stops everything.
    """
    if draining:
        return PoolDiff((), tuple(sorted(running)), ())
    stop = [aid for aid in running if aid not in desired]
    changed = [aid for aid, a in desired.items()
               if aid in running and running[aid] != wanted_form(a, catalog.get(a.model), running[aid])]
    stop += changed
    busy = {g for aid, r in running.items() if aid not in stop for g in r.gpu_indices}
    held_by_stopping = {g for aid in stop for g in running[aid].gpu_indices}
    start: list[Assignment] = []
    problems: list[str] = []
    for aid in sorted(desired):
        a = desired[aid]
        if aid in running and aid not in changed:
            continue
        if a.model not in catalog:
            problems.append(f"{aid}: model {a.model!r} is not in the catalog (ctl models apply)")
            continue
        if a.gpu_indices:
            gpus = set(a.gpu_indices)
            unknown = gpus - set(node_gpus)
            if unknown:
                problems.append(f"{aid}: GPUs {sorted(unknown)} do not exist on this node")
                continue
            if gpus & busy:
                problems.append(f"{aid}: GPUs {sorted(gpus & busy)} are in use by another assignment")
                continue
            if gpus & held_by_stopping:
                continue  # freed once the instance being replaced has drained; next round starts it
        else:
            need = max(1, a.tensor_parallel)
            free = [g for g in sorted(node_gpus) if g not in busy and g not in held_by_stopping]
            if len(free) < need:
                if len(set(node_gpus) - busy) < need:
                    problems.append(f"{aid}: needs {need} free GPUs, node has {len(set(node_gpus) - busy)}")
                continue
            a = Assignment()
            a.CopyFrom(desired[aid])
            a.gpu_indices[:] = free[:need]
            gpus = set(a.gpu_indices)
        busy |= gpus
        start.append(a)
    return PoolDiff(tuple(start), tuple(sorted(stop)), tuple(problems))


class DesiredState:
    """The latest desired assignments, catalog and drain control for one node, from etcd watches."""

    def __init__(self, store: EtcdStore, keys: Keys, node_id: str) -> None:
        self.store = store
        self.keys = keys
        self.node_id = node_id
        self.assignments: dict[str, Assignment] = {}
        self.catalog: dict[str, ModelSpec] = {}
        self.control: NodeControl | None = None
        self.loaded: set[str] = set()
        self.changed = asyncio.Event()
        self._listeners: list[asyncio.Event] = []

    def listener(self) -> asyncio.Event:
        """An event of the caller's own, set on every change (the caller clears it)."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    async def run(self) -> None:
        """Run the three watches until cancelled."""
        await asyncio.gather(
            self._follow("desired", self.keys.desired_for_node(self.node_id), self._apply_desired),
            self._follow("catalog", self.keys.models, self._apply_catalog),
            self._follow("control", self.keys.node_controls, self._apply_control),
        )

    async def _follow(self, name: str, prefix: str, apply: Callable[[dict[str, KeyValue | None], bool], None]) -> None:
        async for update in watch_prefix(self.store, prefix):
            if isinstance(update, Resync):
                apply(dict(update.items), True)
            elif isinstance(update, Changes):
                apply({c.key: c.kv for c in update.changes}, False)
            self.loaded.add(name)
            self.changed.set()
            for event in self._listeners:
                event.set()

    def _apply_desired(self, items: dict[str, KeyValue | None], replace: bool) -> None:
        self.assignments = _merge(self.assignments, items, replace, Assignment)

    def _apply_catalog(self, items: dict[str, KeyValue | None], replace: bool) -> None:
        self.catalog = _merge(self.catalog, items, replace, ModelSpec)

    def _apply_control(self, items: dict[str, KeyValue | None], replace: bool) -> None:
        mine = self.keys.node_control(self.node_id)
        if replace:
            self.control = None
        for key, kv in items.items():
            if key != mine:
                continue
            self.control = _decode_or_none(NodeControl, kv) if kv is not None else None

    @property
    def drain_requested(self) -> bool:
        """True when `ctl nodes drain` asked this node to drain."""
        return bool(self.control and self.control.drain)


def _decode_or_none(msg_type: type[M], kv: KeyValue) -> M | None:
    try:
        return decode(msg_type, kv)
    except RecordDecodeError as exc:
        log.warning("skipping undecodable record", key=kv.key, error=str(exc))
        return None


def _merge(current: dict[str, M], items: dict[str, KeyValue | None], replace: bool, msg_type: type[M]) -> dict[str, M]:
    """Apply a watch batch to a map keyed by the key's last segment (the assignment id, the model name)."""
    out = {} if replace else dict(current)
    for key, kv in items.items():
        name = decode_segment(key.rsplit("/", 1)[-1])
        msg = _decode_or_none(msg_type, kv) if kv is not None else None
        if msg is None:
            out.pop(name, None)
        else:
            out[name] = msg
    return out


async def wait_loaded(state: DesiredState, names: Collection[str], timeout: float) -> bool:
    """Wait until each named watch delivered its first list."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not set(names) <= state.loaded:
                state.changed.clear()
                await state.changed.wait()
            return True
    return False
