"""One model instance on this node: its engine process and its InstanceRecord, kept in step.

    STARTING ──/health OK and model listed──▶ READY ──drain()──▶ DRAINING ──▶ (record removed)
       ▲                                        │
       └── backoff ◀── FAILED ◀── engine exited / unhealthy / would not start

A crashed engine is marked FAILED at once (the gateway stops routing to it), restarted after an
exponential backoff, and the number of restarts and the last error stay in the record. The
lifecycle runs as a supervised loop (``instance-<id>``, controlplane/loops.py): every probe is
progress; a lifecycle that stops making progress (a probe that hangs past its bound) is stuck,
and a bug in it is a failed step. Either way it is restarted, after stopping the engine it
started, instead of leaving the instance frozen in its last state. Draining
marks the record DRAINING, waits until etcd has it (so gateways stop sending new requests), waits
for the engine's in-flight requests to finish (up to a grace period), and only then stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from agent.engines import EngineAdapter, EngineConfigError, EngineSpec
from agent.registration import Registration
from agent.supervisor import PROBE_TIMEOUT_S, EngineProcess
from controlplane.keys import Keys
from controlplane.loops import Backoff, ContinuousLoop, ProgressFn, Supervisor
from controlplane.netutil import free_port
from controlplane.pb import InstanceRecord, InstanceState

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class InstanceTimings:
    """How patient the lifecycle is; tests shrink these."""

    startup_timeout_s: float = 1800.0     # model loading can take long on a cold file system
    probe_interval_s: float = 0.25        # while STARTING
    health_interval_s: float = 2.0        # while READY
    unhealthy_after: int = 3              # consecutive failed probes before a restart
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 30.0          # READY this long resets the backoff
    drain_settle_s: float = 0.5           # after DRAINING is in etcd, before trusting "0 in flight"
    drain_unknown_wait_s: float = 5.0     # engines without metrics: wait this long (capped by grace)
    stop_grace_s: float = 15.0            # TERM → KILL


@dataclass
class InstanceConfig:
    """What to run: the model, its engine, and where."""

    model: str
    adapter: EngineAdapter
    node_id: str
    bind_host: str
    advertise_host: str
    log_dir: Path
    source: str = ""
    gpu_indices: tuple[int, ...] = ()
    gpu_type: str = ""
    extra_args: tuple[str, ...] = ()
    template: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    assignment_id: str = ""
    capacity_weight: float = 1.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class ManagedInstance:
    """Runs one instance until drained; see the module docstring for the state machine."""

    def __init__(self, instance_id: str, config: InstanceConfig, registration: Registration, keys: Keys,
                 http: aiohttp.ClientSession, timings: InstanceTimings | None = None,
                 port_picker: Callable[[str], int] = free_port) -> None:
        self.config = config
        self.registration = registration
        self.http = http
        self.timings = timings or InstanceTimings()
        self.key = keys.instance(config.model, instance_id)
        self.engine: EngineProcess | None = None
        self._port_picker = port_picker
        self._stop = asyncio.Event()
        self._loop: ContinuousLoop | None = None
        self._progress: ProgressFn = lambda: None
        self.record = InstanceRecord(
            instance_id=instance_id, model=config.model, node_id=config.node_id, engine=config.adapter.name,
            gpu_indices=list(config.gpu_indices), gpu_type=config.gpu_type, started_unix_ms=_now_ms(),
            owner=config.owner, assignment_id=config.assignment_id, capacity_weight=config.capacity_weight,
        )

    @property
    def state(self) -> InstanceState:
        """The state last published."""
        return self.record.state

    @property
    def stall_s(self) -> float:
        """How long the lifecycle may go without progress before it counts as stuck: a health
        interval, a probe (two requests, each bounded), an engine stop (TERM grace + KILL), margin."""
        t = self.timings
        return max(t.health_interval_s, t.probe_interval_s) + 2 * 2 * PROBE_TIMEOUT_S + t.stop_grace_s + 10.0

    def start(self, loops: Supervisor) -> None:
        """Start the lifecycle as the supervised loop ``instance-<id>`` of ``loops``."""
        if self._loop is None:
            self._loop = loops.continuous(f"instance-{self.record.instance_id}", self._lifecycle,
                                          stall_s=self.stall_s, backoff=Backoff(base_s=1.0, max_s=30.0))

    async def _lifecycle(self, progress: ProgressFn) -> None:
        self._progress = progress
        progress()
        if self._stop.is_set():
            return
        if self.engine is not None and self.engine.running:  # restarted after a bug or a stall
            log.warning("instance lifecycle restarted; stopping the engine it left", instance=self.record.instance_id)
            await self.engine.stop(self.timings.stop_grace_s)
        await self._run()

    def _publish(self, state: InstanceState, error: str | None = None) -> None:
        if state != self.record.state:
            self.record.state_since_unix_ms = _now_ms()
        self.record.state = state
        if error is not None:
            self.record.last_error = error[-500:]
        self.registration.set(self.key, self.record.SerializeToString())
        log.info("instance state", instance=self.record.instance_id, model=self.config.model,
                 state=InstanceState.Name(state), endpoint=self.record.endpoint, error=error)

    # -- lifecycle -------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            error, ready_since = await self._run_engine_once()
            if self._stop.is_set():
                return
            if ready_since is not None and time.monotonic() - ready_since >= self.timings.stable_after_s:
                failures = 0
            failures += 1
            self.record.restarts += 1
            delay = min(self.timings.backoff_base_s * 2 ** (failures - 1), self.timings.backoff_max_s)
            self._publish(InstanceState.FAILED, f"{error}; restart #{self.record.restarts} in {delay:.1f}s")
            if self.engine is not None:
                await self.engine.stop(self.timings.stop_grace_s)
            self._progress()
            waited = 0.0
            while waited < delay and not self._stop.is_set():  # long backoffs still report progress
                step = min(delay - waited, 5.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), step)
                waited += step
                self._progress()

    async def _run_engine_once(self) -> tuple[str, float | None]:
        """Start the engine and serve until it fails (returns why, and since when it was READY)
        or a stop is requested (returns with the engine still running, for drain to handle)."""
        cfg = self.config
        try:
            port = self._port_picker(cfg.bind_host)
        except OSError as exc:  # --engine-port-range exhausted: FAILED, retried after the backoff
            return f"no engine port: {exc}", None
        spec = EngineSpec(model=cfg.model, port=port, host=cfg.bind_host, source=cfg.source,
                          gpu_indices=cfg.gpu_indices, extra_args=cfg.extra_args, template=cfg.template,
                          options=dict(cfg.options))
        try:
            launch = cfg.adapter.build(spec)
        except EngineConfigError as exc:
            return f"engine configuration: {exc}", None
        self.record.endpoint = f"http://{cfg.advertise_host}:{port}"
        self.record.max_concurrency = launch.max_concurrency
        self.engine = EngineProcess(launch, f"http://{_connect_host(cfg.bind_host, cfg.advertise_host)}:{port}",
                                    cfg.log_dir / f"{self.record.instance_id}.log")
        self._publish(InstanceState.STARTING)
        try:
            await self.engine.start()
        except OSError as exc:
            return f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}", None
        why = await self._wait_ready(self.engine)
        if why is not None or self._stop.is_set():
            return why or "", None
        ready_since = time.monotonic()
        self._record_model_card(self.engine.model_card)
        self._publish(InstanceState.READY, error="" if self.record.restarts == 0 else None)
        return await self._watch_health(self.engine), ready_since

    def _record_model_card(self, card: dict[str, object] | None) -> None:
        """Keep the engine's own model facts (vLLM: max_model_len, root, parent) for /v1/models."""
        self.record.max_model_len, self.record.model_root, self.record.model_parent = model_card_fields(card)

    async def _wait_ready(self, engine: EngineProcess) -> str | None:
        deadline = time.monotonic() + self.timings.startup_timeout_s
        last = "not probed yet"
        while not self._stop.is_set():
            if not engine.running:
                return f"engine exited with status {engine.returncode} while starting (see {engine.log_path})"
            if time.monotonic() > deadline:
                return f"engine not ready after {self.timings.startup_timeout_s:.0f}s: {last}"
            problem = await engine.probe(self.http, self.config.model)
            self._progress()
            if problem is None:
                return None
            last = problem
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.timings.probe_interval_s)
        return None

    async def _watch_health(self, engine: EngineProcess) -> str:
        bad = 0
        exited = asyncio.ensure_future(engine.wait())
        try:
            while not self._stop.is_set():
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({exited, stop}, timeout=self.timings.health_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if self._stop.is_set():
                    return ""
                if exited.done():
                    return f"engine exited with status {engine.returncode} (see {engine.log_path})"
                problem = await engine.probe(self.http, self.config.model)
                self._progress()
                bad = bad + 1 if problem else 0
                if bad >= self.timings.unhealthy_after:
                    return f"engine unhealthy: {problem}"
            return ""
        finally:
            exited.cancel()

    # -- drain -----------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """DRAINING → etcd has it → in-flight done (≤ grace) → engine stopped → record removed."""
        self._stop.set()
        if self._loop is not None:
            try:  # the lifecycle sees the stop between probes; a stuck one is cancelled
                await asyncio.wait_for(self._loop.wait(), self.timings.stop_grace_s + 10)
            except TimeoutError:
                await self._loop.stop()
        engine = self.engine
        serving = self.record.state == InstanceState.READY and engine is not None and engine.running
        if serving:
            self._publish(InstanceState.DRAINING)
            deadline = time.monotonic() + grace_s
            if not await self.registration.flush(timeout=min(5.0, grace_s)):
                log.warning("DRAINING not confirmed in etcd; gateways may still route here until the lease ends",
                            instance=self.record.instance_id)
            assert engine is not None
            await self._wait_idle(engine, deadline)
        if engine is not None:
            await engine.stop(self.timings.stop_grace_s)
        self.registration.remove(self.key)
        log.info("instance drained", instance=self.record.instance_id, model=self.config.model)

    async def _wait_idle(self, engine: EngineProcess, deadline: float) -> None:
        await asyncio.sleep(min(self.timings.drain_settle_s, max(0.0, deadline - time.monotonic())))
        idle_polls = 0
        unknown_until = time.monotonic() + self.timings.drain_unknown_wait_s
        while time.monotonic() < deadline and engine.running:
            n = await engine.in_flight(self.http)
            if n is None and time.monotonic() >= unknown_until:
                return
            idle_polls = idle_polls + 1 if n == 0 else 0
            if idle_polls >= 2:
                return
            await asyncio.sleep(0.1)
        if engine.running:
            log.warning("drain grace over with requests still in flight", instance=self.record.instance_id)


def model_card_fields(card: dict[str, object] | None) -> tuple[int, str, str]:
    """(max_model_len, root, parent) from an engine's /v1/models entry; 0 and "" where absent or odd."""
    if not card:
        return 0, "", ""
    length = card.get("max_model_len")
    root, parent = card.get("root"), card.get("parent")
    valid_length = isinstance(length, int) and not isinstance(length, bool) and 0 < length < 2**32
    return (length if valid_length else 0,  # type: ignore[return-value]  # narrowed above
            root[:500] if isinstance(root, str) else "", parent[:500] if isinstance(parent, str) else "")


def _connect_host(bind_host: str, advertise_host: str) -> str:
    """Where the agent itself reaches the engine: the advertised address unless bound to one."""
    return advertise_host if bind_host in ("0.0.0.0", "::", "") else bind_host
