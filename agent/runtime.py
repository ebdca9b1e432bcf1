"""The agent process: node record + instances on one lease, and a drain that loses nothing.

    discover GPUs, Slurm job ─▶ LeaseSession(on_granted = write node + instances)
                                     │
       ManagedInstance(s) ──state──▶ Registration ──▶ etcd
                                     │
    SIGTERM / SIGUSR1 / job end - drain window ─▶ drain every instance ─▶ delete node ─▶ revoke lease

etcd trouble never stops the engines: the lease session re-grants and re-registers when etcd
answers again, and the engines keep serving meanwhile. Every long-running task (registration,
the desired-state caches, node control, pool reconcile, each instance's lifecycle, the job-end
clock) is a supervised loop (controlplane/loops.py): a failed step is logged and retried with
backoff, and no exception ends a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import structlog

from agent.engines import get_adapter
from agent.gpus import GpuInfo
from agent.instance import InstanceConfig, InstanceTimings, ManagedInstance
from agent.kubernetes import KubernetesPod
from agent.pool import DesiredState, RunningAssignment
from agent.pool import diff as pool_diff
from agent.ports import PortPicker, PortRange
from agent.registration import Registration
from agent.slurm import SlurmJobInfo
from controlplane.keys import Keys
from controlplane.loops import Backoff, ProgressFn, Supervisor
from controlplane.pb import NodeRecord
from controlplane.store import EtcdConfig, EtcdStore, LeaseSession
from controlplane.store.config import parse_endpoint

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class ServeSpec:
    """One model this agent serves on its own (``--serve``)."""

    model: str
    engine: str = "sim"
    source: str = ""
    extra_args: tuple[str, ...] = ()
    template: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    gpus: int = 0                        # GPUs for this instance; 0 = all the node has


@dataclass
class AgentConfig:
    """Everything `ctl agent` decided from its flags and environment."""

    etcd: EtcdConfig
    node_id: str
    gpus: list[GpuInfo]
    serve: list[ServeSpec]
    slurm: SlurmJobInfo | None = None
    bind_host: str = ""                  # "" = 127.0.0.1 if advertising loopback, else 0.0.0.0
    advertise_host: str = ""             # "" = the address this host uses to reach etcd
    lease_ttl: int = 10
    drain_grace_s: float = 60.0
    drain_window_s: float = 120.0        # begin draining this long before the Slurm job ends
    log_dir: Path = Path("logs")
    owner: str = ""
    pool: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    timings: InstanceTimings = field(default_factory=InstanceTimings)
    engine_options: dict[str, dict[str, str]] = field(default_factory=dict)  # per engine, e.g. {"sim": {...}}
    cpu: bool = False                    # --cpu: engines run without GPUs (gpus is empty, gpu_type "CPU")
    engine_ports: PortRange | None = None  # --engine-port-range; None = any free port


def advertise_address(etcd_endpoint: str) -> str:
    """The local address used to reach etcd: the one other hosts can most likely reach us on."""
    host, port, _ = parse_endpoint(etcd_endpoint)
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP connect sends nothing; it only picks the route
        return str(s.getsockname()[0])
    return socket.gethostbyname(socket.gethostname())


def assign_gpus(gpus: list[GpuInfo], serve: list[ServeSpec]) -> list[list[GpuInfo]]:
    """GPUs for each served model, in order; ValueError when they do not add up."""
    if len(serve) == 1 and serve[0].gpus == 0:
        return [list(gpus)]
    if any(s.gpus == 0 for s in serve):
        raise ValueError("with several --serve models, give each a GPU count (MODEL@N)")
    wanted = sum(s.gpus for s in serve)
    if wanted > len(gpus):
        raise ValueError(f"--serve asks for {wanted} GPUs but this node has {len(gpus)}")
    out, at = [], 0
    for s in serve:
        out.append(gpus[at:at + s.gpus])
        at += s.gpus
    return out


class Agent:
    """One agent process; ``run`` returns after a complete drain."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.keys = Keys(config.etcd.prefix)
        self.drain_requested = asyncio.Event()
        self.drain_reason = ""
        self.instances: dict[str, ManagedInstance] = {}     # by assignment id (pool) or instance id (serve)
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._problems: set[str] = set()
        self._node_draining = False
        self._advertise = ""
        self._bind = ""
        self._registration: Registration | None = None
        self._http: aiohttp.ClientSession | None = None
        self.loops = Supervisor()
        self.reconcile_wait_s = 60.0        # pool mode: how long to wait for the desired state to load
        self._ports = PortPicker(config.engine_ports, in_use=self._engine_ports)

    def request_drain(self, reason: str) -> None:
        """Begin draining (signal handlers, job end clock, `ctl nodes drain`); idempotent."""
        if not self.drain_requested.is_set():
            self.drain_reason = reason
            log.info("drain requested", reason=reason)
            self.drain_requested.set()

    def node_record(self) -> NodeRecord:
        """This node as etcd should see it."""
        cfg = self.config
        used = {g for inst in self.instances.values() for g in inst.config.gpu_indices}
        rec = NodeRecord(
            node_id=cfg.node_id, hostname=socket.gethostname(), address=self._advertise,
            gpus=[g.to_pb() for g in cfg.gpus], pool=cfg.pool, started_unix_ms=self._started_ms,
            agent_version=AGENT_VERSION, end_time_unix=cfg.slurm.end_time_unix if cfg.slurm else 0,
            free_gpu_indices=[g.index for g in cfg.gpus if g.index not in used], labels=cfg.labels,
            draining=self._node_draining or self.drain_requested.is_set(),
        )
        if cfg.slurm:
            rec.slurm.CopyFrom(cfg.slurm.to_pb())
        return rec

    def _publish_node(self) -> None:
        assert self._registration is not None
        self._registration.set(self.keys.node(self.config.node_id), self.node_record().SerializeToString())

    def _start_instance(self, key: str, icfg: InstanceConfig) -> None:
        assert self._registration is not None and self._http is not None
        instance_id = f"{self.config.node_id}-{uuid.uuid4().hex[:8]}"
        inst = ManagedInstance(instance_id, icfg, self._registration, self.keys, self._http, self.config.timings,
                               port_picker=self._ports)
        self.instances[key] = inst
        inst.start(self.loops)
        self._publish_node()

    def _engine_ports(self) -> list[int]:
        """Ports this agent's instances hold (their engines may not have bound them yet)."""
        return [port for inst in self.instances.values()
                if (port := urlsplit(inst.record.endpoint).port if inst.record.endpoint else None)]

    async def _stop_instance(self, key: str) -> None:
        inst = self.instances[key]
        try:
            await inst.drain(self.config.drain_grace_s)
        finally:
            self.instances.pop(key, None)
            self._stopping.pop(key, None)
            self._publish_node()

    def _instance_config(self, model: str, engine: str, gpus: list[GpuInfo], **extra: object) -> InstanceConfig:
        return InstanceConfig(
            model=model, adapter=get_adapter(engine), node_id=self.config.node_id, bind_host=self._bind,
            advertise_host=self._advertise, log_dir=self.config.log_dir, gpu_indices=tuple(g.index for g in gpus),
            gpu_type=gpus[0].type if gpus else ("CPU" if self.config.cpu else ""), owner=self.config.owner,
            options=dict(self.config.engine_options.get(engine, {})), **extra,  # type: ignore[arg-type]
        )

    async def run(self) -> None:
        """Register, serve, and drain when asked; never exits because etcd blinked."""
        cfg = self.config
        self._started_ms = int(time.time() * 1000)
        self._advertise = cfg.advertise_host or advertise_address(cfg.etcd.endpoints[0])
        self._bind = cfg.bind_host or ("127.0.0.1" if self._advertise.startswith("127.") else "0.0.0.0")
        gpu_sets = [[] for _ in cfg.serve] if cfg.cpu else assign_gpus(cfg.gpus, cfg.serve) if cfg.serve else []
        store = await EtcdStore(cfg.etcd).connect()
        registration = self._registration = Registration(store)
        session = LeaseSession(store, cfg.lease_ttl, on_granted=registration.on_granted,
                               on_lost=registration.on_lost, name=f"agent-{cfg.node_id}")
        registration.session = session
        self._publish_node()
        async with aiohttp.ClientSession() as http:
            self._http = http
            loops = self.loops
            try:
                for spec, gpus in zip(cfg.serve, gpu_sets, strict=True):
                    icfg = self._instance_config(spec.model, spec.engine, gpus, source=spec.source,
                                                 extra_args=spec.extra_args, template=spec.template)
                    icfg.options.update(spec.options)
                    self._start_instance(f"serve-{spec.model}", icfg)
                session.start()
                registration.start(loops)
                desired = DesiredState(store, self.keys, cfg.node_id)
                desired.start(loops)
                loops.continuous("job-end-clock", self._job_end_clock)
                loops.periodic("node-control", lambda: self._follow_control(desired), interval_s=5.0,
                               wake=desired.listener())
                if cfg.pool:
                    since = time.monotonic()
                    loops.periodic("pool-reconcile", lambda: self._reconcile(desired, since), interval_s=5.0,
                                   wake=desired.listener(), backoff=Backoff(base_s=1.0, max_s=30.0))
                log.info("agent running", node=cfg.node_id, address=self._advertise, pool=cfg.pool,
                         models=[s.model for s in cfg.serve], gpus=[g.type for g in cfg.gpus],
                         slurm_job=cfg.slurm.job_id if cfg.slurm else None)
                await self.drain_requested.wait()
                await self.drain(registration)
            finally:
                await loops.close()
                await self._stop_engines_now()  # a crash above must not leave engines behind
                await session.close(revoke=True)
                await store.close()
        log.info("agent stopped", node=self.config.node_id, reason=self.drain_reason)

    async def _stop_engines_now(self) -> None:
        """Stop every engine still running, at once (the crash path; a drain stopped them already)."""
        for task in list(self._stopping.values()):
            task.cancel()
        # Cancelled stop tasks remove their instance from the dict while we await below: iterate a copy.
        for inst in list(self.instances.values()):
            if inst.engine is not None and inst.engine.running:
                await inst.engine.stop(5)

    async def drain(self, registration: Registration) -> None:
        """Drain every instance concurrently, then remove the node record."""
        started = time.monotonic()
        self._publish_node()  # draining=true: the planner stops placing here
        for key in list(self.instances):
            if key not in self._stopping:
                self._stopping[key] = asyncio.create_task(self._stop_instance(key))
        if self._stopping:
            await asyncio.gather(*list(self._stopping.values()), return_exceptions=True)
        registration.remove(self.keys.node(self.config.node_id))
        await registration.flush(timeout=3.0)
        log.info("drain complete", reason=self.drain_reason, seconds=round(time.monotonic() - started, 3))

    async def _follow_control(self, desired: DesiredState) -> None:
        """`ctl nodes drain`: a serve-mode agent drains and exits; a pool agent stops taking work."""
        if desired.drain_requested != self._node_draining:
            self._node_draining = desired.drain_requested
            self._publish_node()
            if self._node_draining and not self.config.pool:
                reason = desired.control.reason if desired.control else ""
                self.request_drain(f"ctl nodes drain{': ' + reason if reason else ''}")

    async def _reconcile(self, desired: DesiredState, since: float) -> None:
        """Pool mode, one round: converge to desired/<node>/ (level-triggered; the runner retries)."""
        if self.drain_requested.is_set():
            return
        if not {"desired", "catalog", "control"} <= desired.loaded:
            if time.monotonic() - since < self.reconcile_wait_s:
                return  # woken again when a cache loads
            log.warning("desired state not loaded yet; reconciling with what is known")
        self._reconcile_once(desired)

    def _reconcile_once(self, desired: DesiredState) -> None:
        running = {key: RunningAssignment(key, inst.config.model, inst.config.gpu_indices, inst.config.adapter.name)
                   for key, inst in self.instances.items()
                   if inst.config.assignment_id and key not in self._stopping}
        plan = pool_diff(desired.assignments, running, desired.catalog, [g.index for g in self.config.gpus],
                         draining=self._node_draining)
        problems = set(plan.problems)
        for p in problems - self._problems:
            log.warning("assignment cannot run", problem=p)
        self._problems = problems
        for key in plan.stop:
            log.info("stopping assignment", assignment=key)
            self._stopping[key] = asyncio.create_task(self._stop_instance(key), name=f"stop-{key}")
        by_index = {g.index: g for g in self.config.gpus}
        for a in plan.start:
            spec = desired.catalog[a.model]
            engine = a.engine or spec.engine or "vllm"
            gpus = [by_index[i] for i in a.gpu_indices]
            log.info("starting assignment", assignment=a.assignment_id, model=a.model, gpus=list(a.gpu_indices))
            self._start_instance(a.assignment_id, self._instance_config(
                a.model, engine, gpus, source=spec.source, extra_args=tuple(spec.engine_args),
                assignment_id=a.assignment_id))

    async def _job_end_clock(self, progress: ProgressFn) -> None:
        """Request a drain when the Slurm job's end time minus the drain window is reached."""
        slurm = self.config.slurm
        if slurm is None or not slurm.end_time_unix:
            return
        at = slurm.end_time_unix - self.config.drain_window_s
        log.info("drain scheduled for job end", job=slurm.job_id, in_s=round(at - time.time(), 1))
        while (left := at - time.time()) > 0:  # wall clock: re-read often, it may be stepped
            progress()
            await asyncio.sleep(min(left, 30.0))
        self.request_drain(f"Slurm job {slurm.job_id} ends in {self.config.drain_window_s:.0f}s")


def default_node_id(slurm: SlurmJobInfo | None, pod: KubernetesPod | None = None) -> str:
    """The pod name in Kubernetes, ``<host>-<slurm job>`` inside Slurm, else ``<host>-<pid>``."""
    if pod is not None:
        return pod.node_id
    host = socket.gethostname().split(".")[0]
    return f"{host}-job{slurm.job_id}" if slurm else f"{host}-{os.getpid()}"
