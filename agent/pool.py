"""Pool mode: converge this node's instances to the planner's ``desired/<node>/…`` assignments.

Level-triggered, like a Kubernetes controller: whatever happened before, each round compares
what is desired with what runs and acts on the difference. Watch events only wake the loop
early; a periodic resync repairs anything missed. The decision is a pure function (``diff``).

    caches of desired/<node>/, models/, control/nodes/ ──▶ latest desired, catalog, drain control
                                         │ every change or resync_s
                                         ▼
                  diff(desired, running, catalog, gpus) ──▶ start [...] / stop [...] / problems
                                         │
               start: ManagedInstance(assignment) ── stop: drain(grace) in the background
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message

from controlplane.keys import Keys, decode_segment
from controlplane.loops import Supervisor
from controlplane.pb import Assignment, ModelSpec, NodeControl
from controlplane.store import EtcdStore
from controlplane.store.cache import CacheEvent, WatchedCache, proto_decoder

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
    """The latest desired assignments, catalog and drain control for one node, from three caches.

    Each is a WatchedCache run by the agent's loop runner; the maps here are rebuilt from the
    cache on every event (they are small), so there is one apply path and it cannot drift.
    """

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
        self.caches: dict[str, WatchedCache[Any]] = {
            "desired": WatchedCache(store, keys.desired_for_node(node_id), proto_decoder(Assignment),
                                    name="watch-desired", handlers=(self._on_desired,)),
            "catalog": WatchedCache(store, keys.models, proto_decoder(ModelSpec), name="watch-catalog",
                                    handlers=(self._on_catalog,)),
            "control": WatchedCache(store, keys.node_controls, proto_decoder(NodeControl), name="watch-control",
                                    handlers=(self._on_control,)),
        }

    def listener(self) -> asyncio.Event:
        """An event of the caller's own, set on every change (the caller clears it)."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def start(self, loops: Supervisor) -> None:
        """Run the three caches under ``loops`` (they stop with it)."""
        for cache in self.caches.values():
            cache.start(loops)

    def _changed(self, name: str) -> None:
        self.loaded.add(name)
        self.changed.set()
        for event in self._listeners:
            event.set()

    def _on_desired(self, _: CacheEvent[Assignment]) -> None:
        self.assignments = _by_last_segment(self.caches["desired"].items)
        self._changed("desired")

    def _on_catalog(self, _: CacheEvent[ModelSpec]) -> None:
        self.catalog = _by_last_segment(self.caches["catalog"].items)
        self._changed("catalog")

    def _on_control(self, _: CacheEvent[NodeControl]) -> None:
        self.control = self.caches["control"].items.get(self.keys.node_control(self.node_id))
        self._changed("control")

    @property
    def drain_requested(self) -> bool:
        """True when `ctl nodes drain` asked this node to drain."""
        return bool(self.control and self.control.drain)


def _by_last_segment(items: Mapping[str, M]) -> dict[str, M]:
    """Records keyed by their key's last segment (the assignment id, the model name)."""
    return {decode_segment(key.rsplit("/", 1)[-1]): rec for key, rec in items.items()}


async def wait_loaded(state: DesiredState, names: Collection[str], timeout: float) -> bool:
    """Wait until each named watch delivered its first list."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not set(names) <= state.loaded:
                state.changed.clear()
                await state.changed.wait()
            return True
    return False
