"""Child processes that never outlive their parent: own process group, parent-death signal.

Used by `ctl dev` and the tests to run etcd, gateways, agents and engines.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux/glibc: the process group kill in stop() still applies
        return None


# Resolved here, in the parent: the child runs preexec_fn between fork and exec, where a dlopen could
# deadlock on a loader lock some other thread (gRPC's pollers) held at fork time.
_prctl = _load_prctl()


def set_parent_death_signal() -> None:
    """preexec_fn for Popen: the child gets SIGTERM when the thread that started it exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: Sequence[str], log_path: Path | None = None, env: Mapping[str, str] | None = None,
          *, die_with_parent: bool = True, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so signals go to its whole group), output to ``log_path``."""
    stdout = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            list(argv),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=set_parent_death_signal if die_with_parent else None,
        )
    finally:
        if log_path is not None:
            stdout.close()  # type: ignore[union-attr]


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (ignores groups already gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """Signal the group, wait up to ``timeout``, then SIGKILL the group. Returns the exit code."""
    if proc.poll() is None:
        signal_group(proc, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Kill stragglers in the group even when the leader already exited.
    signal_group(proc, signal.SIGKILL)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """Stop several processes concurrently: signal all, then wait for all within ``timeout``."""
    for p in procs:
        if p.poll() is None:
            signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        signal_group(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def exit_watchdog(within_s: float, code: int) -> threading.Timer:
    """Make the process exit with ``code`` within ``within_s`` seconds, whatever still runs.

    Armed once a daemon's work is done (drained, lease revoked): interpreter and event-loop
    teardown then joins library threads, and gRPC's asyncio pollers can hang there (grpc/grpc
    #40989). A process manager waiting for our exit must not wait on that forever.
    """
    def fire() -> None:
        sys.stderr.write(f"exit: teardown still running {within_s:g}s after the work finished; exiting {code}\n")
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(within_s, fire)
    timer.daemon = True
    timer.start()
    return timer
