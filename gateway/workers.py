"""Several gateway processes on one port: SO_REUSEPORT listeners, supervised by the parent.

    ctl gateway --workers N
      parent ── anchor socket: bound (SO_REUSEPORT), never listening: claims the port, fails fast
        │       if it is taken, and never receives a connection
        ├─ fork ▶ worker 0: own socket + own Gateway + own uvloop loop; it listens once
        │                   its routing table is loaded, so it never answers 404 for a model
        ├─ fork ▶ worker 1: …                   the kernel spreads new connections over the
        │                                        listening sockets by a hash of the 4-tuple
        ├─ a worker exits while serving ─▶ fork a replacement after a backoff (0.5 s … 30 s)
        └─ SIGTERM / SIGINT ─▶ forwarded to every worker, which drains (Gateway.stop);
                               the parent exits when all are gone. A second signal is forwarded
                               too and cuts the drain short; past the drain deadline: SIGKILL.

Workers run in their own process group so that a signal sent to the parent's group (Ctrl-C,
``kill -- -PGID``) reaches them once, through the parent; they die with the parent
(PR_SET_PDEATHSIG) if it is killed outright. Each worker has its own ``gateway_id``, routing
table, etcd watch and in-flight counts: least-loaded picking is per worker. ``/metrics`` merges
every worker's series with a ``worker`` label (``gateway/worker_metrics.py``), whichever worker
accepts the scrape.

With one worker there is no parent: the process serves the port itself, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import structlog

from controlplane.procs import exit_watchdog, set_parent_death_signal
from gateway.app import Gateway, GatewayConfig

log = structlog.get_logger(__name__)

STABLE_AFTER_S = 30.0  # a worker that served this long resets the restart backoff
KILL_MARGIN_S = 10.0   # past shutdown_timeout + this, stragglers are SIGKILLed
LISTEN_AFTER_LOAD_S = 10.0  # a worker listens once its table is loaded, or after this long regardless


class BindError(OSError):
    """The gateway cannot listen on the requested address."""


def worker_count(requested: int) -> int:
    """``--workers`` as a process count: 0 means one per CPU this process may run on."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def backoff_delay(failures: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Seconds to wait before restarting a worker that failed ``failures`` times in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap_s, base_s * 2 ** (failures - 1)))


def worker_gateway_id(base: str, slot: int, generation: int) -> str:
    """A distinct gateway id per worker process (a restarted worker is a new gateway)."""
    return f"{base}-w{slot}" if generation == 0 else f"{base}-w{slot}.{generation}"


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool, backlog: int = 1024) -> socket.socket:
    """A TCP socket bound to ``host:port`` (listening if asked); BindError with the reason otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(exc.errno, f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if listen:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, exc.strerror or str(exc)) from None
    sock.set_inheritable(True)
    return sock


def serve_in_process(config: GatewayConfig, sock: socket.socket, shutdown_timeout: float,
                     listen_after_load_s: float = 0.0) -> None:
    """Serve ``sock`` with one gateway on a fresh uvloop loop until SIGTERM/SIGINT, then drain.

    With ``listen_after_load_s`` > 0, ``sock`` must be bound but not listening: it starts to
    listen once the routing table is loaded from etcd (or after that many seconds), so a worker
    that joins running siblings never answers 404 for models they route. A second signal cuts
    the drain short.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux
        asyncio.run(_serve(config, sock, shutdown_timeout, listen_after_load_s))
    else:
        uvloop.run(_serve(config, sock, shutdown_timeout, listen_after_load_s))


async def _serve(config: GatewayConfig, sock: socket.socket, shutdown_timeout: float,
                 listen_after_load_s: float) -> None:
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.info("stop signal again; cutting the drain short", signal=name)
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    gateway = Gateway(config)
    await gateway.start(sock, listen_after_load_s)
    await stop.wait()
    log.info("draining", timeout_s=shutdown_timeout)
    drain = asyncio.create_task(gateway.stop(shutdown_timeout))
    hurried = asyncio.create_task(hurry.wait())
    await asyncio.wait([drain, hurried], return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not drain.done():
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await gateway.stop(0)
    else:
        drain.result()
    # Drained, and the etcd/usage teardown is done: exit even if loop teardown hangs in gRPC's pollers.
    exit_watchdog(10.0, 0)


def run_gateway(config: GatewayConfig, host: str, port: int, workers: int = 1, shutdown_timeout: float = 30.0) -> int:
    """Serve the gateway on ``host:port`` with ``workers`` processes; returns the exit status.

    Raises BindError when the address cannot be used (before any worker starts).
    """
    count = worker_count(workers)
    if count == 1:
        sock = bind_socket(host, port, reuse_port=False, listen=True)
        log.info("gateway listening", host=host, port=sock.getsockname()[1], auth=config.auth,
                 gateway_id=config.gateway_id, workers=1)
        serve_in_process(config, sock, shutdown_timeout, listen_after_load_s=LISTEN_AFTER_LOAD_S)
        return 0
    return Supervisor(config, host, port, count, shutdown_timeout).run()


@dataclass
class _Slot:
    """One worker position: the process now filling it and its restart history."""

    index: int
    process: BaseProcess | None = None
    generation: int = 0
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """The parent of ``count`` workers: starts, restarts, forwards signals, waits for the drain."""

    def __init__(self, config: GatewayConfig, host: str, port: int, count: int, shutdown_timeout: float) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.slots = [_Slot(i) for i in range(count)]
        self._ctx = multiprocessing.get_context("fork")
        self._anchor: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping_since: float | None = None
        self._metrics_dir = ""

    def run(self) -> int:
        """Supervise until every worker has exited after a stop signal; returns 0."""
        self._anchor = bind_socket(self.host, self.port, reuse_port=True, listen=False)
        self._metrics_dir = tempfile.mkdtemp(prefix="modelpool-gateway-metrics-")
        self.port = int(self._anchor.getsockname()[1])  # --port 0: every worker shares the port picked here
        self._install_signal_wakeup()
        log.info("gateway listening", host=self.host, port=self.port, auth=self.config.auth,
                 gateway_id=self.config.gateway_id, workers=len(self.slots))
        try:
            for slot in self.slots:
                self._start(slot)
            self._loop()
        finally:
            self._kill_all(signal.SIGKILL)
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._anchor.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("gateway stopped", gateway_id=self.config.gateway_id)
        return 0

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            alive = [s.process for s in self.slots if s.process is not None]
            if self._stopping_since is not None:
                if not alive:
                    return
                deadline = self._stopping_since + self.shutdown_timeout + KILL_MARGIN_S
                if now >= deadline:
                    log.warning("workers did not drain in time; killing them", left=len(alive))
                    self._kill_all(signal.SIGKILL)
                timeout: float | None = max(0.0, deadline - now)
            else:
                due = [s.restart_at for s in self.slots if s.restart_at is not None]
                timeout = max(0.0, min(due) - now) if due else None
            ready = multiprocessing.connection.wait([self._wake_r, *(p.sentinel for p in alive)], timeout)
            if self._wake_r in ready:
                self._on_signals()
            self._reap()
            self._restart_due()

    def _on_signals(self) -> None:
        try:
            received = os.read(self._wake_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum not in (signal.SIGTERM, signal.SIGINT):
                continue
            first = self._stopping_since is None
            if first:
                self._stopping_since = time.monotonic()
                for slot in self.slots:
                    slot.restart_at = None
            log.info("stopping workers" if first else "stop signal again; cutting the drain short",
                     signal=signal.Signals(signum).name)
            self._kill_all(signum)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.is_alive():
                continue
            proc.join()
            slot.process = None
            if self._stopping_since is not None:
                log.info("worker exited", worker=slot.index, pid=proc.pid, code=proc.exitcode)
                continue
            slot.failures = 1 if now - slot.started_at >= STABLE_AFTER_S else slot.failures + 1
            delay = backoff_delay(slot.failures)
            slot.restart_at = now + delay
            log.warning("worker died; restarting", worker=slot.index, pid=proc.pid, code=proc.exitcode,
                        restart_in_s=delay)

    def _restart_due(self) -> None:
        if self._stopping_since is not None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                slot.generation += 1
                self._start(slot)

    # -- processes ---------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        try:
            sock = bind_socket(self.host, self.port, reuse_port=True, listen=False)
        except BindError as exc:  # the anchor holds the port, so this is rare (fd limits…): retry later
            slot.failures += 1
            slot.restart_at = time.monotonic() + backoff_delay(slot.failures)
            log.error("cannot open a listening socket for a worker", worker=slot.index, error=str(exc))
            return
        cfg = dataclasses.replace(self.config,
                                  gateway_id=worker_gateway_id(self.config.gateway_id, slot.index, slot.generation),
                                  worker_metrics_dir=self._metrics_dir, worker_slot=slot.index)
        assert self._anchor is not None  # bound in run() before any worker starts
        close_in_child = (self._anchor.fileno(), self._wake_r, self._wake_w)
        proc = self._ctx.Process(target=_worker_main, name=f"gateway-worker-{slot.index}", daemon=True,
                                 args=(cfg, sock, slot.index, os.getpid(), close_in_child, self.shutdown_timeout))
        try:
            proc.start()
        finally:
            sock.close()  # the worker holds the only copy: when it dies, no connection waits on it
        slot.process = proc
        slot.started_at = time.monotonic()
        log.info("worker started", worker=slot.index, pid=proc.pid, gateway_id=cfg.gateway_id)

    def _kill_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    def _install_signal_wakeup(self) -> None:
        # Handlers do nothing; the signal numbers arrive on the pipe and are handled in the loop.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)


def _worker_main(config: GatewayConfig, sock: socket.socket, index: int, parent_pid: int,
                 close_fds: tuple[int, ...], shutdown_timeout: float) -> None:
    """Entry point of a forked worker."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.setpgid(0, 0)  # the parent alone receives group signals, and forwards them once
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    structlog.contextvars.bind_contextvars(worker=index, gateway_id=config.gateway_id)
    serve_in_process(config, sock, shutdown_timeout, listen_after_load_s=LISTEN_AFTER_LOAD_S)

