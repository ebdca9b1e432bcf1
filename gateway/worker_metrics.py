"""``/metrics`` of a gateway run with ``--workers N``: every worker's series, labelled ``worker``.

Each worker keeps its own Prometheus registry, and the kernel hands a scrape to whichever worker
accepts it. So that one scrape sees the whole process group, every worker also serves its own
metrics on a private loopback port and publishes that port in a directory the supervisor made:

    scrape ─▶ any worker ─▶ its own registry            ─┐
                          └▶ GET 127.0.0.1:<port>/metrics of each sibling (1 s timeout) ─┤
                                                        merge: add worker="<slot>" ◀─────┘

A sibling that does not answer (restarting, stuck) is left out of that scrape and logged; the
scrape itself never fails because of it. Sum over ``worker`` in queries for gateway totals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger(__name__)

WORKER_LABEL = "worker"
PORT_SUFFIX = ".port"
FETCH_TIMEOUT_S = 1.0


def merge_exposition(texts: Mapping[str, str]) -> bytes:
    """One exposition text from several workers' texts (worker id → text), each sample labelled."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, WORKER_LABEL: worker}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


class _Static:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class WorkerMetrics:
    """This worker's private metrics endpoint, and the merged view of all workers."""

    def __init__(self, directory: str, slot: int, own: Callable[[], bytes]) -> None:
        self.directory = Path(directory)
        self.slot = str(slot)
        self.own = own
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Serve our own metrics on 127.0.0.1 (any port) and publish the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._serve_own)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server's sockets
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        tmp = self.directory / f".{self.slot}.{os.getpid()}"
        tmp.write_text(str(self.port))
        os.replace(tmp, self.directory / f"{self.slot}{PORT_SUFFIX}")  # a restarted worker replaces its slot

    async def stop(self) -> None:
        """Stop serving; remove our port file unless a successor already replaced it."""
        path = self.directory / f"{self.slot}{PORT_SUFFIX}"
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(self.port):
                path.unlink()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve_own(self, _: web.Request) -> web.Response:
        return web.Response(body=self.own(), content_type="text/plain", charset="utf-8")

    async def render(self) -> bytes:
        """Every reachable worker's metrics, merged, with a ``worker`` label."""
        texts = {self.slot: self.own().decode()}
        for path in sorted(self.directory.glob(f"*{PORT_SUFFIX}")):
            worker = path.name[: -len(PORT_SUFFIX)]
            if worker == self.slot:
                continue
            text = await self._fetch(worker, path)
            if text is not None:
                texts[worker] = text
        return merge_exposition(texts)

    async def _fetch(self, worker: str, path: Path) -> str | None:
        assert self._session is not None  # start() ran before the gateway serves
        try:
            port = int(path.read_text().strip())
            async with self._session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                resp.raise_for_status()
                return await resp.text()
        except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            log.info("worker metrics unavailable for this scrape", worker=worker, error=str(exc) or type(exc).__name__)
            return None
