"""One engine process: start it from an EngineLaunch, probe it, count its in-flight work, stop it.

The engine runs in its own process group (so TERM/KILL reach its workers, e.g. vLLM's) with a
parent-death signal, and writes stdout+stderr to a log file of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import structlog

from agent.engines import EngineLaunch
from controlplane.procs import set_parent_death_signal

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 2.0


class EngineProcess:
    """A running (or exited) engine; ``base_url`` is where it serves."""

    def __init__(self, launch: EngineLaunch, base_url: str, log_path: Path) -> None:
        self.launch = launch
        self.base_url = base_url.rstrip("/")
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self.model_card: dict[str, object] | None = None  # the engine's /v1/models entry, last probe

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Exit status once exited; None while running (or never started)."""
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the engine; raises OSError when the program cannot be executed."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.launch.env}
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== starting: {list(self.launch.argv)!r}\n".encode())
            out.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *self.launch.argv, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=set_parent_death_signal,
            )
        log.info("engine started", pid=self._proc.pid, argv=list(self.launch.argv), log=str(self.log_path))

    async def wait(self) -> int:
        """Wait for the process to exit; returns its status."""
        assert self._proc is not None, "wait() before start()"
        return await self._proc.wait()

    async def probe(self, session: aiohttp.ClientSession, model: str) -> str | None:
        """None when healthy and serving ``model``; else a short reason why not."""
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with session.get(self.base_url + self.launch.health_path, timeout=timeout) as resp:
                if resp.status != 200:
                    return f"{self.launch.health_path} answered {resp.status}"
            async with session.get(self.base_url + self.launch.models_path, timeout=timeout) as resp:
                if resp.status != 200:
                    return f"{self.launch.models_path} answered {resp.status}"
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"not answering: {type(exc).__name__} {exc}".strip()
        cards = [m for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        card = next((m for m in cards if m.get("id") == model), None)
        if card is None:
            return f"serves {[m.get('id') for m in cards]}, not {model!r}"
        self.model_card = card
        return None

    async def in_flight(self, session: aiohttp.ClientSession) -> int | None:
        """Requests running + waiting per the engine's vLLM-style metrics; None when unknown."""
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with session.get(self.base_url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return None
        return parse_in_flight(text)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the group, wait ``grace_s``, then SIGKILL. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace_s)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group, even if the leader exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        log.info("engine stopped", pid=proc.pid, returncode=proc.returncode)
        return proc.returncode


def parse_in_flight(metrics_text: str) -> int | None:
    """Sum ``vllm:num_requests_running`` and ``…_waiting`` (sglang's names too); None when absent."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting",
             "sglang:num_running_reqs", "sglang:num_queue_reqs")
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    return round(total) if seen else None


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
