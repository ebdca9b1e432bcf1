"""`ctl dev`: the whole pool on one machine — etcd, a gateway and sim-engine agents.

    ctl dev
      ├─ etcd (single member, data in a temp dir; auto-compaction and a quota: controlplane/etcdproc.py)
      ├─ ctl gateway  --host 127.0.0.1 --port 8080 --no-auth
      └─ ctl agent    --serve <model> --engine sim     (one per demo model)
                         └─ python -m agent.sim        (a real OpenAI-compatible server)

Ctrl-C, SIGTERM or SIGHUP (the terminal went away) stops every child (agents drain first),
removes the temp dir, and leaves no process behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from controlplane.cli.common import ExitCode, fail
from controlplane.cli.main import app
from controlplane.etcdproc import EtcdNotFound, EtcdProcess, EtcdStartError
from controlplane.netutil import free_port
from controlplane.procs import spawn, stop, stop_all

DEMO_MODELS = ("demo-chat", "demo-code")
console = Console(stderr=True)


def _port_free(port: int) -> bool:
    """True when a server could listen on ``port`` now. SO_REUSEADDR as etcd and the gateway bind:
    without it, connections of the last run still in TIME_WAIT (about 60 s) make a free port look
    taken, and a restarted `ctl dev` moved etcd off 2379."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "controlplane.cli.main", *args]


@dataclass
class DevCluster:
    """The processes of one `ctl dev` run."""

    workdir: Path
    gateway_port: int
    models: tuple[str, ...]
    etcd: EtcdProcess | None = None
    gateway: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    prefix: str = "/modelpool"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start_etcd(self, port: int | None) -> None:
        client_port = port if port is not None else (2379 if _port_free(2379) else free_port())
        self.etcd = EtcdProcess(data_dir=self.workdir / "etcd", client_port=client_port)
        self.etcd.data_dir.mkdir(parents=True, exist_ok=True)
        self.etcd.start()

    def start_gateway(self) -> None:
        assert self.etcd is not None
        self.gateway = spawn(
            _ctl("gateway", "--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix, "--host", "127.0.0.1",
                 "--port", str(self.gateway_port), "--no-auth"),
            self.logs / "gateway.log",
        )

    def start_agents(self) -> None:
        assert self.etcd is not None
        for n, model in enumerate(self.models, start=1):
            self.agents[model] = spawn(
                _ctl("agent", "--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix, "--serve", model,
                     "--engine", "sim", "--gpus", "1xSIM-24GB", "--node-id", f"dev-node-{n}",
                     "--lease-ttl", "5", "--drain-grace", "10",
                     "--log-dir", str(self.logs / f"engines-{n}"),
                     "--sim-option", "ttft_ms=30", "--sim-option", "tokens_per_s=200"),
                self.logs / f"agent-{n}-{model}.log",
            )

    def dead_child(self) -> str | None:
        """Name of a child that exited on its own, if any."""
        if self.gateway is not None and self.gateway.poll() is not None:
            return f"gateway (exit {self.gateway.returncode})"
        for model, proc in self.agents.items():
            if proc.poll() is not None:
                return f"agent for {model} (exit {proc.returncode})"
        if self.etcd is not None and (self.etcd.proc is None or self.etcd.proc.poll() is not None):
            return "etcd"
        return None

    def ready_models(self) -> set[str]:
        """Models the gateway lists right now (empty if it does not answer yet)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway_port}/v1/models", timeout=1) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            return set()
        return {m.get("id", "") for m in body.get("data", [])}

    def shutdown(self) -> None:
        # Agents first (they drain: DRAINING, wait for in-flight, stop engine, revoke lease),
        # then the gateway, then etcd.
        stop_all(list(self.agents.values()), timeout=20)
        if self.gateway is not None:
            stop(self.gateway, timeout=10)
        if self.etcd is not None:
            self.etcd.kill(signal.SIGTERM)


def _ready_banner(c: DevCluster) -> str:
    url = f"http://127.0.0.1:{c.gateway_port}/v1"
    m = c.models[0]
    assert c.etcd is not None
    default_port = c.etcd.client_port == 2379
    env_hint = "" if default_port else f"\n  export MODELPOOL_ETCD={c.etcd.endpoint}   # for other ctl commands\n"
    status_cmd = "ctl status" if default_port else f"ctl status --etcd {c.etcd.endpoint}"
    return f"""
[bold green]modelpool dev is ready[/]: gateway {url}  etcd {c.etcd.endpoint}  models {", ".join(c.models)}
{env_hint}
  curl {url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{m}", "messages": [{{"role": "user", "content": "Hello!"}}], "stream": true}}'

  pip install openai && python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}", api_key="dev"); \\
r = c.chat.completions.create(model="{m}", messages=[{{"role": "user", "content": "Hi"}}]); \\
print(r.choices[0].message.content)'

  {status_cmd}      logs: {c.logs}      Ctrl-C stops everything.
"""


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


@app.command(epilog="Example:  ctl dev   |   ctl dev --gateway-port 9000 --models demo-chat,my-model")
def dev(
    gateway_port: Annotated[int, typer.Option(help="Port of the gateway on 127.0.0.1.")] = 8080,
    models: Annotated[str, typer.Option(
        help="Comma-separated demo model names, one sim agent each.")] = ",".join(DEMO_MODELS),
    etcd_port: Annotated[int | None, typer.Option(
        help="etcd client port (default: 2379 if free, else any free port).")] = None,
    workdir: Annotated[Path | None, typer.Option(
        help="Directory for etcd data and logs (default: a temp dir, removed on exit).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for everything to become ready.")] = 60.0,
) -> None:
    """Run etcd, a gateway and sim-engine agents on this machine; Ctrl-C stops them all."""
    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        fail("--models needs at least one name", ExitCode.USAGE)
    if not _port_free(gateway_port):
        fail(f"port {gateway_port} on 127.0.0.1 is in use; pick another with --gateway-port", ExitCode.USAGE)
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="modelpool-dev-")) if workdir is None else workdir
    cluster = DevCluster(workdir=wd, gateway_port=gateway_port, models=names)
    cluster.logs.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    code = ExitCode.OK
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("starting etcd", total=len(names) + 2)
            try:
                cluster.start_etcd(etcd_port)
            except (EtcdNotFound, EtcdStartError) as exc:
                fail(str(exc), ExitCode.UNAVAILABLE)
            progress.update(task, advance=1, description="starting gateway and agents")
            cluster.start_gateway()
            cluster.start_agents()
            progress.advance(task)
            deadline = time.monotonic() + timeout
            while (ready := cluster.ready_models()) < set(names):
                progress.update(task, completed=2 + len(ready & set(names)),
                                description=f"waiting for models: {', '.join(sorted(set(names) - ready))}")
                if (dead := cluster.dead_child()) is not None:
                    raise RuntimeError(f"{dead} stopped during start-up; see the logs in {cluster.logs}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {timeout:.0f}s; see the logs in {cluster.logs}")
                time.sleep(0.1)
        console.print(_ready_banner(cluster), highlight=False, soft_wrap=True)  # commands stay copyable
        print(f"ready gateway=http://127.0.0.1:{gateway_port}/v1 etcd={cluster.etcd.endpoint if cluster.etcd else ''}",
              flush=True)
        while (dead := cluster.dead_child()) is None:
            time.sleep(0.5)
        console.print(f"[red]{dead} stopped unexpectedly[/]; shutting down (logs in {cluster.logs})")
        code = ExitCode.ERROR
    except _Stop as sig:
        console.print(f"received {sig}; stopping agents (draining), gateway and etcd …")
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        code = ExitCode.ERROR
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        cluster.shutdown()
        if own_dir and code == ExitCode.OK:
            shutil.rmtree(wd, ignore_errors=True)
        elif own_dir:
            console.print(f"logs kept in {cluster.logs}")
    raise typer.Exit(int(code))
