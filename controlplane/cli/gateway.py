"""`ctl gateway`: run an OpenAI-compatible gateway over the pool."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Annotated

import typer

from controlplane.accounting.compact import CompactSettings
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    EtcdQuotaOpt,
    ExitCode,
    KeyOpt,
    PasswordFileOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    etcd_quota,
    fail,
)
from controlplane.cli.main import app
from controlplane.logsetup import configure_logging
from gateway.app import GatewayConfig
from gateway.edge import EdgeLimits
from gateway.fleet import FleetSettings
from gateway.proxy import ProxySettings
from gateway.workers import BindError, run_gateway

EXAMPLE = """
Examples:

  ctl gateway --etcd etcd1:2379,etcd2:2379 --port 8080
  ctl gateway --etcd etcd1:2379 --port 8080 --workers 0     # one process per CPU on the same port
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
    no_auth: Annotated[bool, typer.Option("--no-auth",
                                          help="Accept requests without API keys (loopback only).")] = False,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", min=1, help="Largest request body accepted "
                                             "(413 past it, decided from Content-Length before the body).")] = 32,
    body_budget_mb: Annotated[int, typer.Option("--body-budget-mb", min=1, help="Request-body bytes held in memory "
                                                "at once over all connections (503 + Retry-After past it).")] = 256,
    max_connections: Annotated[int, typer.Option("--max-connections", min=0, help="Client connections at most; "
                                                 "at the cap the oldest without a complete request head are shed. "
                                                 "0 = (RLIMIT_NOFILE - --fd-reserve) / 2.")] = 0,
    fd_reserve: Annotated[int, typer.Option("--fd-reserve", min=0, help="File descriptors kept out of the "
                                            "derived connection cap (etcd, logs, listeners).")] = 256,
    head_timeout: Annotated[float, typer.Option("--head-timeout", min=0.1, help="Seconds a client has to send a "
                                                "whole request head (from accept, or from its first byte on a "
                                                "kept-alive connection); 408 past it.")] = 20.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.1, help="Seconds a client has to send a "
                                                "whole request body after its head; 408 past it.")] = 60.0,
    write_timeout: Annotated[float, typer.Option("--write-timeout", min=0.1, help="Seconds a client may leave our "
                                                 "answer unread before the connection is cut (and the engine's "
                                                 "request cancelled).")] = 60.0,
    keepalive_timeout: Annotated[float, typer.Option("--keepalive-timeout", min=0.1, help="Seconds an idle "
                                                     "keep-alive connection stays open.")] = 75.0,
    max_json_depth: Annotated[int, typer.Option("--max-json-depth", min=2, help="Deepest nesting of a request "
                                                "body's JSON (400 past it, before any engine sees it).")] = 128,
    max_url_kb: Annotated[int, typer.Option("--max-url-kb", min=1, help="Longest request URL (414 past it).")] = 16,
    max_headers: Annotated[int, typer.Option("--max-headers", min=8, help="Most request headers (431 past it).")] = 128,
    max_header_kb: Annotated[int, typer.Option("--max-header-kb", min=1, help="Most bytes of request headers, and "
                                               "apart of chunked trailers (431 past it).")] = 64,
    max_upstream_head_kb: Annotated[int, typer.Option("--max-upstream-head-kb", min=1, help="Largest response head "
                                                      "an engine may send (502 past it).")] = 64,
    linger_timeout: Annotated[float, typer.Option("--linger-timeout", min=0.1, help="Seconds the rest of a "
                                                  "rejected request's body is read and discarded, so the client "
                                                  "sees the answer, before the connection closes.")] = 5.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", min=1, help="Instances tried per request before "
                                              "the first byte.")] = 3,
    stall_timeout: Annotated[float, typer.Option("--stall-timeout", min=1, help="Seconds a stream may stay silent "
                                                 "before it is cut.")] = 300.0,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Processes serving the port (SO_REUSEPORT), "
                                         "restarted if they die; 0 = one per CPU.")] = 1,
    advertise: Annotated[str | None, typer.Option("--advertise", help="host:port clients use to reach this "
                                                  "gateway, recorded in etcd (default: --host:--port).")] = None,
    lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, help="TTL (s) of the gateway's registration, "
                                           "demand records and fleet membership.")] = 10,
    publish_interval: Annotated[float, typer.Option("--publish-interval", "--demand-interval", min=0.5,
                                                    help="Seconds between rewrites of this gateway's record "
                                                    "(planner demand and rate-limit load; only when changed).")] = 2.0,
    demand_window: Annotated[int, typer.Option("--demand-window", min=5, help="Seconds of traffic the published "
                                               "demand rates average over.")] = 60,
    usage_flush: Annotated[float, typer.Option("--usage-flush", min=0.5, help="Seconds between usage writes "
                                               "to etcd (a SIGKILL loses at most this much usage).")] = 5.0,
    usage_keep_days: Annotated[int, typer.Option("--usage-keep-days", min=3, help="Days kept per day in etcd; "
                                                 "older usage is folded into months.")] = 40,
    usage_compact_interval: Annotated[float, typer.Option("--usage-compact-interval", min=1, help="Seconds between "
                                                          "usage compactions (by the elected gateway).")] = 60.0,
    quota: EtcdQuotaOpt = "2GiB",
    gateway_id: Annotated[str | None, typer.Option("--id", help="This gateway's id in etcd, unique among running "
                                                   "gateways (default: random per start); workers get <id>-w<N>. "
                                                   "Usage stays exact either way: every start writes its own records "
                                                   "and the fleet folds those of stopped gateways.")] = None,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None,
    etcd_password_file: PasswordFileOpt = None,
) -> None:
    """Route OpenAI API calls to READY instances of the pool, streaming included.

    Watches instances and API keys in etcd; keeps routing on its last table if etcd goes away.
    With --workers N, N processes share the port and a parent restarts any that dies.
    """
    configure_logging(component="gateway")
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    if no_auth and not is_loopback(host):
        fail(f"--no-auth is only allowed on a loopback address (not {host!r}): anyone could use the pool",
             ExitCode.USAGE)
    edge = EdgeLimits(max_body_bytes=max_body_mb * 1024 * 1024, body_budget_bytes=body_budget_mb * 1024 * 1024,
                      max_connections=max_connections, fd_reserve=fd_reserve, head_timeout_s=head_timeout,
                      body_timeout_s=body_timeout, write_timeout_s=write_timeout,
                      keepalive_timeout_s=keepalive_timeout, linger_s=linger_timeout,
                      max_json_depth=max_json_depth, max_url_bytes=max_url_kb * 1024, max_headers=max_headers,
                      max_header_bytes=max_header_kb * 1024, max_upstream_head_bytes=max_upstream_head_kb * 1024)
    cfg = GatewayConfig(etcd=config, auth=not no_auth, edge=edge,
                        proxy=ProxySettings(max_attempts=max_attempts, stall_timeout_s=stall_timeout),
                        address=advertise or f"{host}:{port}", demand_window_s=demand_window,
                        etcd_quota_bytes=etcd_quota(quota),
                        fleet=FleetSettings(lease_ttl_s=lease_ttl, publish_interval_s=publish_interval,
                                            usage_flush_s=usage_flush, compact_interval_s=usage_compact_interval,
                                            compact=CompactSettings(keep_days=usage_keep_days)))
    if gateway_id is not None:
        if not gateway_id.strip() or "/" in gateway_id:
            fail(f"--id must be non-empty and contain no '/': {gateway_id!r}", ExitCode.USAGE)
        cfg = dataclasses.replace(cfg, gateway_id=gateway_id.strip())
    try:
        code = run_gateway(cfg, host, port, workers=workers, shutdown_timeout=30)
    except BindError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.UNAVAILABLE)
    if code:
        raise typer.Exit(code)
