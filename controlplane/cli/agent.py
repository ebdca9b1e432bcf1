"""`ctl agent`: run the node agent (in a Slurm job, a Kubernetes pod, or anywhere with GPUs, --gpus or --cpu)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from agent.engines import ADAPTERS
from agent.engines.base import EngineConfigError
from agent.engines.command import parse_command_template
from agent.gpus import GpuDiscoveryError, discover_gpus
from agent.instance import InstanceTimings
from agent.kubernetes import detect_kubernetes
from agent.ports import PortRange, PortRangeError
from agent.runtime import Agent, AgentConfig, ServeSpec, assign_gpus, default_node_id
from agent.slurm import detect_slurm_job
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    ExitCode,
    KeyOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    fail,
    run_async,
)
from controlplane.cli.main import app
from controlplane.logsetup import configure_logging

EXAMPLE = """
Examples:

  # serve one model on this job's GPUs (vLLM), registered in the pool's etcd
  ctl agent --etcd etcd1:2379,etcd2:2379 --serve meta-llama/Llama-3.1-8B-Instruct --engine vllm

  # a simulated engine on a host without GPUs
  ctl agent --etcd 127.0.0.1:2379 --serve demo --engine sim --gpus 1xSIM-24GB --sim-option ttft_ms=50

  # a CPU build of vLLM on a host without GPUs, engine ports only from 8100-8199
  ctl agent --etcd 127.0.0.1:2379 --serve tiny --engine vllm --source ./tiny-llama --cpu \
      --engine-port-range 8100-8199 --engine-arg=--load-format --engine-arg=dummy

  # donate 4 GPUs to the planner (pool mode)
  ctl agent --etcd etcd1:2379 --pool
"""


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    """``["k=v", …]`` → dict; exits 2 naming the flag on a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{flag} expects KEY=VALUE, got {item!r}", ExitCode.USAGE)
        out[key.strip()] = value
    return out


def parse_serve(item: str) -> tuple[str, int]:
    """``MODEL`` or ``MODEL@GPUS`` → (model, gpu count; 0 = all)."""
    model, sep, count = item.rpartition("@")
    if not sep:
        return item, 0
    if not model or not count.isdigit() or int(count) < 1:
        fail(f"--serve expects MODEL or MODEL@GPUS (GPUS >= 1), got {item!r}", ExitCode.USAGE)
    return model, int(count)


@app.command(epilog=EXAMPLE)
def agent(
    serve: Annotated[list[str] | None, typer.Option("--serve", help="Model to serve (MODEL or MODEL@GPUS); "
                                                     "repeatable.")] = None,
    pool: Annotated[bool, typer.Option("--pool", help="Offer this node's GPUs to the planner and run what it "
                                       "assigns (desired/<node>/).")] = False,
    engine: Annotated[str, typer.Option("--engine", help=f"Engine: {', '.join(sorted(ADAPTERS))}.")] = "vllm",
    source: Annotated[str, typer.Option("--source", help="Weights path or HF id (default: the model name).")] = "",
    engine_arg: Annotated[list[str] | None, typer.Option("--engine-arg", help="Extra engine argument; repeatable, "
                                                          "one argument each (never split on spaces).")] = None,
    template: Annotated[str, typer.Option("--template", help="`command` engine: argv template with {port} {model} "
                                          "{weights} {gpus} {host} {tp}, shell-quoted.")] = "",
    sim_option: Annotated[list[str] | None, typer.Option("--sim-option", help="sim engine KEY=VALUE "
                                                          "(ttft_ms, tokens_per_s, max_concurrency, …).")] = None,
    engine_option: Annotated[list[str] | None, typer.Option("--engine-option", help="Engine KEY=VALUE "
                                                             "(e.g. max_concurrency=64).")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", envvar="MODELPOOL_GPUS", help="GPU override, e.g. 2xA100-80GB "
                                             "(hosts without NVML).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", envvar="MODELPOOL_CPU", help="Run engines on the CPU: no GPU is "
                                      "looked for or given (no CUDA_VISIBLE_DEVICES); --serve only.")] = False,
    engine_port_range: Annotated[str, typer.Option("--engine-port-range", envvar="MODELPOOL_ENGINE_PORT_RANGE",
                                                   help="Engine ports come from LOW-HIGH (sites whose firewalls "
                                                   "open only some ports); default: any free port.")] = "",
    node_id: Annotated[str | None, typer.Option("--node-id", help="Node id (default: the pod name in Kubernetes, "
                                                "else host + Slurm job).")] = None,
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, help="Lease TTL in seconds.")] = 10,
    drain_grace: Annotated[float, typer.Option("--drain-grace", min=0, help="Seconds to let in-flight requests "
                                               "finish when draining.")] = 60.0,
    drain_window: Annotated[float, typer.Option("--drain-window", min=0, help="Start draining this many seconds "
                                                "before the Slurm job ends.")] = 120.0,
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Engine log files go here.")] = Path("logs"),
    advertise_address: Annotated[str, typer.Option("--advertise-address", help="Address gateways reach engines on "
                                                   "(default: the one used to reach etcd).")] = "",
    bind_host: Annotated[str, typer.Option("--bind-host", help="Address engines listen on (default: 127.0.0.1 when "
                                           "advertising loopback, else 0.0.0.0).")] = "",
    owner: Annotated[str, typer.Option("--owner", help="Who adds this capacity (default: $USER).")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="Node label KEY=VALUE; repeatable.")] = None,
    startup_timeout: Annotated[float, typer.Option("--startup-timeout", min=1, help="Seconds an engine may take "
                                                   "to become ready.")] = 1800.0,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
) -> None:
    """Start engines for --serve models and register them in the pool until drained.

    SIGTERM, SIGINT or SIGUSR1 (Slurm's pre-end signal) drain: instances turn DRAINING, in-flight
    requests finish (up to --drain-grace), engines stop, records disappear, the lease is revoked.
    """
    configure_logging(component="agent")
    if not serve and not pool:
        fail("nothing to do: give --serve MODEL, --pool, or both", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    if engine not in ADAPTERS:
        fail(f"unknown engine {engine!r}; known: {', '.join(sorted(ADAPTERS))}", ExitCode.USAGE)
    try:
        parsed_template = parse_command_template(template) if template else ()
    except EngineConfigError as exc:
        fail(str(exc), ExitCode.USAGE)
    # --engine-option applies to --engine; --sim-option to the sim engine (also when the planner assigns it)
    engine_options: dict[str, dict[str, str]] = {engine: parse_pairs(engine_option or [], "--engine-option")}
    engine_options.setdefault("sim", {}).update(parse_pairs(sim_option or [], "--sim-option"))
    options = engine_options[engine]
    if cpu and (pool or gpus):
        fail("--cpu runs --serve models without GPUs: it cannot be combined with "
             + ("--pool" if pool else "--gpus"), ExitCode.USAGE)
    try:
        ports = PortRange.parse(engine_port_range) if engine_port_range else None
    except PortRangeError as exc:
        fail(str(exc), ExitCode.USAGE)
    try:
        found = [] if cpu else discover_gpus(gpus)
    except GpuDiscoveryError as exc:
        fail(f"{exc} (or run engines on the CPU with --cpu)", ExitCode.USAGE)
    pod = detect_kubernetes()
    slurm = None if pod else detect_slurm_job()  # a pod has no Slurm job, whatever its environment says
    specs = []
    for item in serve or []:
        model, count = parse_serve(item)
        if cpu and count:
            fail(f"--serve {item!r}: with --cpu there are no GPUs to count; give the model name alone",
                 ExitCode.USAGE)
        specs.append(ServeSpec(model=model, engine=engine, source=source, extra_args=tuple(engine_arg or []),
                               template=parsed_template, options=options, gpus=count))
    labels = {**(pod.labels() if pod else {}), **parse_pairs(label or [], "--label")}
    cfg = AgentConfig(
        etcd=config, node_id=node_id or default_node_id(slurm, pod), gpus=found, serve=specs, slurm=slurm,
        bind_host=bind_host, advertise_host=advertise_address or (pod.pod_ip if pod else ""), lease_ttl=lease_ttl,
        drain_grace_s=drain_grace, drain_window_s=drain_window, log_dir=log_dir,
        owner=owner or (slurm.user if slurm else "") or os.environ.get("USER", ""), labels=labels,
        timings=InstanceTimings(startup_timeout_s=startup_timeout), pool=pool, engine_options=engine_options,
        cpu=cpu, engine_ports=ports,
    )
    try:
        if cfg.serve and not cpu:
            assign_gpus(cfg.gpus, cfg.serve)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)

    async def main() -> None:
        runner = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig, why in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGUSR1, "SIGUSR1")):
            loop.add_signal_handler(sig, runner.request_drain, why)
        await runner.run()

    run_async(main, exit_within_s=10)
