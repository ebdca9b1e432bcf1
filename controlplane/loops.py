"""Supervised control loops: the one runner every long-running task of modelpool uses.

A *loop* repeats a step forever. No exception ends it (``asyncio.CancelledError`` does: that is
how a loop is stopped); a failed step is logged and retried after an exponential backoff with
full jitter; every loop has a status that ``/readyz`` renders and a Prometheus collector exports.

    Supervisor
      ├─ periodic("demand", step, interval_s=5)
      │      step() ──ok──▶ wait(interval | wake event) ──▶ step() …
      │        └─fail / timeout_s─▶ wait(backoff: uniform(0, min(max, base·2^(n-1)))) ──▶ step()
      └─ continuous("watch-instances", run, stall_s=15)
             run(progress) runs until it raises (then: backoff, run again);
             progress() marks it alive. No progress for stall_s ──▶ STUCK: cancelled, run again.

Two kinds of step, because control loops come in two shapes:

* **periodic**: a short step run every ``interval_s`` (or sooner when its ``wake`` event is
  set), bounded by ``timeout_s``. A step may return a float: the delay until its next run.
* **continuous**: a long-running step (a watch consumer, an instance lifecycle) that reports
  progress. It is healthy while it reports progress at least every ``stall_s``; a step that
  stops reporting is *stuck* (a hung etcd, a stream that went silent): it is cancelled and
  started again, and the loop shows STUCK until it reports progress again.

States (``LoopState``)::

    STARTING ──first success/progress──▶ OK ◀──success── FAILING ◀──failure── OK
                                          │                  ▲
                                          └──no progress──▶ STUCK ──(restart fails)──┘
    any ──cancelled / returned──▶ STOPPED

The clock, the random source and the sleep are injectable, so backoff and status are tested
without waiting (``tests/unit/test_loops.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from controlplane.store.errors import StoreError

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Rng = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
ProgressFn = Callable[[], None]
PeriodicStep = Callable[[], Awaitable[float | None]]
ContinuousStep = Callable[[ProgressFn], Awaitable[None]]

#: Errors that are expected in a distributed system (etcd away, a peer gone, a deadline): logged
#: as one warning line. Anything else is a bug and is logged with its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (StoreError, OSError, TimeoutError)

STEP_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LoopState(enum.StrEnum):
    """Where a loop is; see the module docstring for the transitions."""

    STARTING = "starting"
    OK = "ok"
    FAILING = "failing"
    STUCK = "stuck"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS's "full jitter": uniform over [0, cap])."""

    base_s: float = 0.1
    max_s: float = 30.0

    def cap(self, failures: int) -> float:
        """The upper bound of the delay after ``failures`` consecutive failures (≥ 1)."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(failures - 1, 62))

    def delay(self, failures: int, rng: Rng) -> float:
        """A delay drawn uniformly from [0, cap(failures)]; ``rng`` returns floats in [0, 1)."""
        return self.cap(failures) * min(1.0, max(0.0, rng()))


@dataclass(frozen=True)
class LoopStatus:
    """A loop's status at one moment (what /readyz and the metrics show)."""

    name: str
    kind: str                            # "periodic" | "continuous"
    state: LoopState
    consecutive_failures: int
    failures_total: int
    steps_total: int                     # periodic: steps run; continuous: runs started
    last_error: str
    last_success_age_s: float | None     # None: never succeeded (or reported progress)
    last_step_s: float | None            # duration of the last finished periodic step

    @property
    def healthy(self) -> bool:
        """True when OK (a STARTING loop is not unhealthy yet: it is not counted as a problem)."""
        return self.state in (LoopState.OK, LoopState.STARTING)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (rounded ages)."""
        return {
            "state": self.state.value, "consecutive_failures": self.consecutive_failures,
            "failures_total": self.failures_total, "last_error": self.last_error,
            "last_success_age_s": None if self.last_success_age_s is None else round(self.last_success_age_s, 3),
        }


class Loop:
    """One supervised loop (made by ``Supervisor.periodic`` / ``Supervisor.continuous``)."""

    def __init__(self, supervisor: Supervisor, name: str, kind: str, *, backoff: Backoff) -> None:
        self.name = name
        self.kind = kind
        self.backoff = backoff
        self._sup = supervisor
        self._state = LoopState.STARTING
        self._consecutive = 0
        self._failures = 0
        self._steps = 0
        self._last_error = ""
        self._last_success: float | None = None
        self._last_step_s: float | None = None
        self._durations = [0] * (len(STEP_BUCKETS) + 1)
        self._duration_sum = 0.0
        self._task: asyncio.Task[None] | None = None
        self._log = log.bind(loop=name)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> LoopStatus:
        """This loop's status now."""
        now = self._sup.clock()
        return LoopStatus(
            name=self.name, kind=self.kind, state=self._state, consecutive_failures=self._consecutive,
            failures_total=self._failures, steps_total=self._steps, last_error=self._last_error,
            last_success_age_s=None if self._last_success is None else max(0.0, now - self._last_success),
            last_step_s=self._last_step_s,
        )

    @property
    def state(self) -> LoopState:
        """The loop's state now."""
        return self._state

    def _set_state(self, state: LoopState) -> None:
        if state is not self._state:
            level = "info" if state in (LoopState.OK, LoopState.STOPPED, LoopState.STARTING) else "warning"
            getattr(self._log, level)("loop state", state=state.value, was=self._state.value,
                                      consecutive_failures=self._consecutive)
            self._state = state

    def _succeeded(self) -> None:
        if self._consecutive:
            self._log.info("loop recovered", after_failures=self._consecutive)
        self._consecutive = 0
        self._last_success = self._sup.clock()
        self._set_state(LoopState.OK)

    def _failed(self, exc: BaseException, state: LoopState = LoopState.FAILING) -> float:
        """Record a failure; returns the backoff delay to wait before the next try."""
        self._consecutive += 1
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        delay = self.backoff.delay(self._consecutive, self._sup.rng)
        fields = {"error": self._last_error, "consecutive_failures": self._consecutive, "retry_in_s": round(delay, 3)}
        if isinstance(exc, self._sup.expected_errors):
            self._log.warning("loop step failed", **fields)
        else:
            self._log.error("loop step failed", exc_info=exc, **fields)
        self._set_state(state)
        return delay

    def _observe(self, seconds: float) -> None:
        self._last_step_s = seconds
        self._durations[bisect_left(STEP_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    # -- lifecycle ---------------------------------------------------------------------------

    def _start(self, body: Callable[[], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._guard(body), name=f"loop-{self.name}")

    async def _guard(self, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
        finally:
            self._set_state(LoopState.STOPPED)

    @property
    def running(self) -> bool:
        """True until the loop was stopped (or its continuous step returned)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sup._forget(self)

    async def wait(self) -> None:
        """Wait until the loop ends on its own (a continuous step that returned)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)


def _cancelled_from_outside() -> bool:
    """True when the current task is being cancelled (not just a CancelledError raised inside a step)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class PeriodicLoop(Loop):
    """A step run every ``interval_s`` (or when woken), with a timeout and backoff on failure."""

    def __init__(self, supervisor: Supervisor, name: str, step: PeriodicStep, *, interval_s: float,
                 timeout_s: float | None, backoff: Backoff, wake: asyncio.Event | None, run_first: bool) -> None:
        super().__init__(supervisor, name, "periodic", backoff=backoff)
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.step = step
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.wake = wake if wake is not None else asyncio.Event()
        self._start(lambda: self._run(run_first))

    def trigger(self) -> None:
        """Run the step soon (when not backing off after a failure)."""
        self.wake.set()

    async def _pause(self, delay: float) -> None:
        if self.wake.is_set():
            return
        waiter = asyncio.ensure_future(self.wake.wait())
        sleeper = asyncio.ensure_future(self._sup.sleep(max(0.0, delay)))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def _run(self, run_first: bool) -> None:
        if not run_first:
            await self._pause(self.interval_s)
        while True:
            self.wake.clear()  # a wake during the step runs it again right after
            started = self._sup.clock()
            self._steps += 1
            try:
                async with asyncio.timeout(self.timeout_s):
                    result = await self.step()
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                self._observe(self._sup.clock() - started)
                await self._sup.sleep(self._failed(RuntimeError("step was cancelled from inside")))
                continue
            except TimeoutError as exc:
                self._observe(self._sup.clock() - started)
                err = exc if str(exc) else TimeoutError(f"step timed out after {self.timeout_s}s")
                await self._sup.sleep(self._failed(err))
                continue
            except Exception as exc:  # the point of a supervised loop: no exception ends it
                self._observe(self._sup.clock() - started)
                await self._sup.sleep(self._failed(exc))
                continue
            self._observe(self._sup.clock() - started)
            self._succeeded()
            await self._pause(self.interval_s if result is None else float(result))


class ContinuousLoop(Loop):
    """A long-running step that reports progress; restarted after failures and when stuck."""

    def __init__(self, supervisor: Supervisor, name: str, run: ContinuousStep, *, stall_s: float | None,
                 backoff: Backoff) -> None:
        super().__init__(supervisor, name, "continuous", backoff=backoff)
        self.run = run
        self.stall_s = stall_s
        self._last_progress = 0.0
        self._start(self._run)

    def progress(self) -> None:
        """The step is alive (it read something, finished a probe, …)."""
        self._last_progress = self._sup.clock()
        if self._state is not LoopState.OK or self._consecutive:
            self._succeeded()
        else:
            self._last_success = self._last_progress

    async def _run(self) -> None:
        while True:
            self._steps += 1
            self._last_progress = self._sup.clock()
            step = asyncio.ensure_future(self.run(self.progress))
            try:
                stuck = await self._supervise(step)
            except asyncio.CancelledError:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step
                raise
            if stuck:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step
                err = TimeoutError(f"no progress for {self.stall_s}s (stuck); restarting it")
                await self._sup.sleep(self._failed(err, LoopState.STUCK))
                continue
            if step.cancelled():
                await self._sup.sleep(self._failed(RuntimeError("step was cancelled from inside")))
                continue
            exc = step.exception()
            if exc is None:
                self._log.info("loop step returned; loop done")
                self._sup._forget(self)  # finished, not failed: no longer a loop to report
                return
            await self._sup.sleep(self._failed(exc))

    async def _supervise(self, step: asyncio.Future[None]) -> bool:
        """Wait for ``step`` to end; True when it stopped reporting progress first."""
        if self.stall_s is None:
            await asyncio.wait({step})
            return False
        while True:
            remaining = self._last_progress + self.stall_s - self._sup.clock()
            if remaining <= 0:
                return True
            done, _ = await asyncio.wait({step}, timeout=remaining)
            if done:
                return False


class Supervisor:
    """Runs loops, keeps their statuses, and stops them all on ``close``.

    ``clock``, ``rng`` and ``sleep`` are injectable for tests; ``expected_errors`` are logged
    as one line, other exceptions with their traceback (they are bugs, still not fatal).
    """

    def __init__(self, *, clock: Clock = time.monotonic, rng: Rng = random.random, sleep: Sleep = asyncio.sleep,
                 expected_errors: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> None:
        self.clock = clock
        self.rng = rng
        self.sleep = sleep
        self.expected_errors = expected_errors
        self._loops: dict[str, Loop] = {}

    def periodic(self, name: str, step: PeriodicStep, *, interval_s: float, timeout_s: float | None = None,
                 backoff: Backoff | None = None, wake: asyncio.Event | None = None,
                 run_first: bool = True) -> PeriodicLoop:
        """Start a periodic loop: ``step()`` now (unless not ``run_first``), then every ``interval_s``
        or when ``wake`` is set; each run bounded by ``timeout_s``. ``step`` may return the delay
        until its next run."""
        self._check_name(name)
        loop = PeriodicLoop(self, name, step, interval_s=interval_s, timeout_s=timeout_s,
                            backoff=backoff or Backoff(), wake=wake, run_first=run_first)
        self._loops[name] = loop
        return loop

    def continuous(self, name: str, run: ContinuousStep, *, stall_s: float | None = None,
                   backoff: Backoff | None = None) -> ContinuousLoop:
        """Start a continuous loop: ``run(progress)`` until it raises (then again, after a backoff);
        with ``stall_s``, a run that reports no progress for that long is cancelled and restarted."""
        self._check_name(name)
        loop = ContinuousLoop(self, name, run, stall_s=stall_s, backoff=backoff or Backoff())
        self._loops[name] = loop
        return loop

    def _check_name(self, name: str) -> None:
        old = self._loops.get(name)
        if old is not None and old.running:
            raise ValueError(f"a loop named {name!r} is already running")

    def _forget(self, loop: Loop) -> None:
        if self._loops.get(loop.name) is loop:
            del self._loops[loop.name]

    def get(self, name: str) -> Loop | None:
        """The loop named ``name``, if any."""
        return self._loops.get(name)

    def statuses(self) -> list[LoopStatus]:
        """Every loop's status, by name."""
        return [self._loops[n].status() for n in sorted(self._loops)]

    def problems(self) -> list[LoopStatus]:
        """Loops that are failing, stuck or stopped."""
        return [s for s in self.statuses() if not s.healthy]

    async def close(self) -> None:
        """Stop every loop (cancel, then wait for each to end)."""
        loops = list(self._loops.values())
        for loop in loops:
            if loop._task is not None:
                loop._task.cancel()
        for loop in loops:
            await loop.stop()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def collector(self, prefix: str = "modelpool_loop") -> LoopCollector:
        """A Prometheus collector of these loops (register it in a CollectorRegistry)."""
        return LoopCollector(self, prefix)


class LoopCollector:
    """Prometheus metrics of a Supervisor's loops, read at scrape time.

    ``<prefix>_up{loop}`` 1 while OK; ``<prefix>_state{loop,state}`` 1 for the current state;
    ``<prefix>_failures_total{loop}``; ``<prefix>_consecutive_failures{loop}``;
    ``<prefix>_last_success_age_seconds{loop}``; ``<prefix>_step_duration_seconds{loop}`` (periodic).
    Loop names come from code, never from input, so the label sets are bounded.
    """

    def __init__(self, supervisor: Supervisor, prefix: str = "modelpool_loop") -> None:
        self._sup = supervisor
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        """The samples, one family at a time."""
        p = self._prefix
        loops = [self._sup._loops[n] for n in sorted(self._sup._loops)]
        up = GaugeMetricFamily(f"{p}_up", "1 while the loop is OK (not starting, failing, stuck or stopped)",
                               labels=["loop"])
        state = GaugeMetricFamily(f"{p}_state", "1 for the loop's current state", labels=["loop", "state"])
        failures = CounterMetricFamily(f"{p}_failures", "Failed steps (exceptions, timeouts, stuck runs)",
                                       labels=["loop"])
        consecutive = GaugeMetricFamily(f"{p}_consecutive_failures", "Failures since the last success",
                                        labels=["loop"])
        age = GaugeMetricFamily(f"{p}_last_success_age_seconds", "Seconds since the last success or progress",
                                labels=["loop"])
        duration = HistogramMetricFamily(f"{p}_step_duration_seconds", "Duration of periodic steps",
                                         labels=["loop"])
        for loop in loops:
            st = loop.status()
            up.add_metric([loop.name], 1.0 if st.state is LoopState.OK else 0.0)
            for s in LoopState:
                state.add_metric([loop.name, s.value], 1.0 if st.state is s else 0.0)
            failures.add_metric([loop.name], float(st.failures_total))
            consecutive.add_metric([loop.name], float(st.consecutive_failures))
            if st.last_success_age_s is not None:
                age.add_metric([loop.name], st.last_success_age_s)
            if loop.kind == "periodic":
                running, buckets = 0, []
                for bound, count in zip((*STEP_BUCKETS, float("inf")), loop._durations, strict=True):
                    running += count
                    buckets.append((floatToGoString(bound), float(running)))
                duration.add_metric([loop.name], buckets, loop._duration_sum)
        yield from (up, state, failures, consecutive, age, duration)
