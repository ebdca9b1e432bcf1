"""`ctl exporter`: pool gauges from etcd and engines as Prometheus http_sd targets."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

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
    open_store,
    run_async,
)
from controlplane.cli.main import app
from controlplane.keys import Keys
from controlplane.logsetup import configure_logging

EXAMPLE = """
Examples:

  # next to Prometheus: pool gauges at :9464/metrics, engine targets at :9464/sd/engines
  ctl exporter --etcd etcd1:2379 --host 0.0.0.0 --port 9464

  # in prometheus.yml
  #   - job_name: modelpool-engines
  #     http_sd_configs: [{url: "http://exporter-host:9464/sd/engines"}]
"""


@app.command(epilog=EXAMPLE)
def exporter(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 9464,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
) -> None:
    """Serve the pool's gauges (instances by state, models ready, GPUs by type) and http_sd targets.

    Reads nodes/, instances/ and models/ from etcd at most every 2 s, whatever the scrape rate.
    """
    from aiohttp import web

    from controlplane.exporter import Exporter

    configure_logging(component="exporter")
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)

    async def main() -> None:
        store = await open_store(config)
        runner = web.AppRunner(Exporter(store, Keys(config.prefix)).app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.UNAVAILABLE)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()
            await store.close()

    run_async(main, exit_within_s=10)
