"""`ctl gateway`: run an OpenAI-compatible gateway over the pool."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import structlog
import typer
from aiohttp import web

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
)
from controlplane.cli.main import app
from controlplane.logsetup import configure_logging
from gateway.app import GatewayConfig, build_app
from gateway.proxy import ProxySettings

EXAMPLE = """
Examples:

  ctl gateway --etcd etcd1:2379,etcd2:2379 --port 8080
  curl -H "Authorization: Bearer $KEY" http://localhost:8080/v1/models
"""


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command(epilog=EXAMPLE)
def gateway(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8080,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Accept requests without API keys (loopback only).")] = False,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", min=1, help="Largest request body accepted.")] = 32,
    max_attempts: Annotated[int, typer.Option("--max-attempts", min=1, help="Instances tried per request before "
                                              "the first byte.")] = 3,
    stall_timeout: Annotated[float, typer.Option("--stall-timeout", min=1, help="Seconds a stream may stay silent "
                                                 "before it is cut.")] = 300.0,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
) -> None:
    """Route OpenAI API calls to READY instances of the pool, streaming included.

    Watches instances and API keys in etcd; keeps routing on its last table if etcd goes away.
    """
    configure_logging(component="gateway")
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    if no_auth and not is_loopback(host):
        fail(f"--no-auth is only allowed on a loopback address (not {host!r}): anyone could use the pool",
             ExitCode.USAGE)
    cfg = GatewayConfig(etcd=config, auth=not no_auth, max_body_bytes=max_body_mb * 1024 * 1024,
                        proxy=ProxySettings(max_attempts=max_attempts, stall_timeout_s=stall_timeout))
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - non-Linux
        pass
    structlog.get_logger("gateway").info("gateway listening", host=host, port=port, auth=cfg.auth,
                                         gateway_id=cfg.gateway_id)
    try:
        web.run_app(build_app(cfg), host=host, port=port, print=None, access_log=None, handler_cancellation=True,
                    shutdown_timeout=30)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.UNAVAILABLE)
