"""The agent process: node record + instances on one lease, and a drain that loses nothing.

    discover GPUs, Slurm job ─▶ LeaseSession(on_granted = write node + instances)
                                     │
       ManagedInstance(s) ──state──▶ Registration ──▶ etcd
                                     │
    SIGTERM / SIGUSR1 / job end - drain window ─▶ drain every instance ─▶ delete node ─▶ revoke lease

etcd trouble never stops the engines: the lease session re-grants and re-registers when etcd
answers again, and the engines keep serving meanwhile.
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

import aiohttp
import structlog

from agent.engines import get_adapter
from agent.gpus import GpuInfo
from agent.instance import InstanceConfig, InstanceTimings, ManagedInstance
from agent.registration import Registration
from agent.slurm import SlurmJobInfo
from controlplane.keys import Keys
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
        self.instances: list[ManagedInstance] = []

    def request_drain(self, reason: str) -> None:
        """Begin draining (signal handlers, job end clock, `ctl nodes drain`); idempotent."""
        if not self.drain_requested.is_set():
            self.drain_reason = reason
            log.info("drain requested", reason=reason)
            self.drain_requested.set()

    def node_record(self, advertise: str, used: set[int]) -> NodeRecord:
        """This node as etcd should see it."""
        cfg = self.config
        end = cfg.slurm.end_time_unix if cfg.slurm else 0
        rec = NodeRecord(
            node_id=cfg.node_id, hostname=socket.gethostname(), address=advertise,
            gpus=[g.to_pb() for g in cfg.gpus], pool=cfg.pool, started_unix_ms=int(time.time() * 1000),
            agent_version=AGENT_VERSION, end_time_unix=end,
            free_gpu_indices=[g.index for g in cfg.gpus if g.index not in used], labels=cfg.labels,
        )
        if cfg.slurm:
            rec.slurm.CopyFrom(cfg.slurm.to_pb())
        return rec

    async def run(self) -> None:
        """Register, serve, and drain when asked; never exits because etcd blinked."""
        cfg = self.config
        advertise = cfg.advertise_host or advertise_address(cfg.etcd.endpoints[0])
        bind = cfg.bind_host or ("127.0.0.1" if advertise.startswith("127.") else "0.0.0.0")
        gpu_sets = assign_gpus(cfg.gpus, cfg.serve)
        store = await EtcdStore(cfg.etcd).connect()
        registration = Registration(store)
        session = LeaseSession(store, cfg.lease_ttl, on_granted=registration.on_granted,
                               on_lost=registration.on_lost, name=f"agent-{cfg.node_id}")
        registration.session = session
        used = {g.index for gs in gpu_sets for g in gs}
        registration.set(self.keys.node(cfg.node_id), self.node_record(advertise, used).SerializeToString())
        async with aiohttp.ClientSession() as http:
            for spec, gpus in zip(cfg.serve, gpu_sets, strict=True):
                instance_id = f"{cfg.node_id}-{uuid.uuid4().hex[:8]}"
                icfg = InstanceConfig(
                    model=spec.model, adapter=get_adapter(spec.engine), node_id=cfg.node_id, bind_host=bind,
                    advertise_host=advertise, log_dir=cfg.log_dir, source=spec.source,
                    gpu_indices=tuple(g.index for g in gpus), gpu_type=gpus[0].type if gpus else "",
                    extra_args=spec.extra_args, template=spec.template, options=dict(spec.options),
                    owner=cfg.owner,
                )
                self.instances.append(ManagedInstance(instance_id, icfg, registration, self.keys, http,
                                                      cfg.timings))
            session.start()
            sync = asyncio.create_task(registration.run(), name="registration")
            clock = asyncio.create_task(self._job_end_clock(), name="job-end-clock")
            for inst in self.instances:
                inst.start()
            log.info("agent running", node=cfg.node_id, address=advertise, models=[s.model for s in cfg.serve],
                     gpus=[g.type for g in cfg.gpus], slurm_job=cfg.slurm.job_id if cfg.slurm else None)
            try:
                await self.drain_requested.wait()
                await self.drain(registration)
            finally:
                clock.cancel()
                for inst in self.instances:  # a crash above must not leave engines behind
                    if inst.engine is not None and inst.engine.running:
                        await inst.engine.stop(5)
                await session.close(revoke=True)
                sync.cancel()
                await store.close()
        log.info("agent stopped", node=self.config.node_id, reason=self.drain_reason)

    async def drain(self, registration: Registration) -> None:
        """Drain every instance concurrently, then remove the node record."""
        started = time.monotonic()
        await asyncio.gather(*(inst.drain(self.config.drain_grace_s) for inst in self.instances))
        registration.remove(self.keys.node(self.config.node_id))
        await registration.flush(timeout=3.0)
        log.info("drain complete", reason=self.drain_reason, seconds=round(time.monotonic() - started, 3))

    async def _job_end_clock(self) -> None:
        """Request a drain when the Slurm job's end time minus the drain window is reached."""
        slurm = self.config.slurm
        if slurm is None or not slurm.end_time_unix:
            return
        at = slurm.end_time_unix - self.config.drain_window_s
        delay = at - time.time()
        log.info("drain scheduled for job end", job=slurm.job_id, in_s=round(delay, 1))
        await asyncio.sleep(max(0.0, delay))
        self.request_drain(f"Slurm job {slurm.job_id} ends in {self.config.drain_window_s:.0f}s")


def default_node_id(slurm: SlurmJobInfo | None) -> str:
    """``<host>-<slurm job>`` inside Slurm, else ``<host>-<pid>``."""
    host = socket.gethostname().split(".")[0]
    return f"{host}-job{slurm.job_id}" if slurm else f"{host}-{os.getpid()}"
