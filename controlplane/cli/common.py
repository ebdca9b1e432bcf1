"""Options and helpers every `ctl` command shares: etcd connection flags, exit codes, async run."""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer

from controlplane.logsetup import configure_command_logging
from controlplane.procs import exit_watchdog
from controlplane.store import EtcdConfig, EtcdConfigError, EtcdStore, StoreError

T = TypeVar("T")


class ExitCode(enum.IntEnum):
    """What `ctl` exit codes mean (documented in docs/cli.md)."""

    OK = 0
    CHANGES = 1          # `ctl plan`: the plan has changes (Terraform's -detailed-exitcode habit)
    USAGE = 2            # bad flags or arguments (click's own code)
    NOT_FOUND = 3        # the named thing does not exist
    CONFLICT = 4         # a guarded write lost a race (stale plan, changed state)
    UNAVAILABLE = 5      # etcd or another dependency cannot be reached
    ERROR = 255          # anything else


class OutputFormat(enum.StrEnum):
    """-o/--output values."""

    table = "table"
    json = "json"


EtcdOpt = Annotated[str | None, typer.Option("--etcd", envvar="MODELPOOL_ETCD",
                                             help="etcd endpoints, comma-separated (host:port or https://host:port).")]
PrefixOpt = Annotated[str | None, typer.Option("--etcd-prefix", envvar="MODELPOOL_ETCD_PREFIX",
                                               help="Key prefix of this pool in etcd (default: /modelpool).")]
CaOpt = Annotated[Path | None, typer.Option("--etcd-cacert", envvar="MODELPOOL_ETCD_CACERT",
                                            help="CA certificate (enables TLS).")]
CertOpt = Annotated[Path | None, typer.Option("--etcd-cert", envvar="MODELPOOL_ETCD_CERT",
                                              help="Client certificate (mTLS).")]
KeyOpt = Annotated[Path | None, typer.Option("--etcd-key", envvar="MODELPOOL_ETCD_KEY", help="Client key (mTLS).")]
UserOpt = Annotated[str | None, typer.Option("--etcd-user", envvar="MODELPOOL_ETCD_USER",
                                             help="etcd user (password from MODELPOOL_ETCD_PASSWORD).")]
PasswordFileOpt = Annotated[Path | None, typer.Option(
    "--etcd-password-file", envvar="MODELPOOL_ETCD_PASSWORD_FILE",
    help="File holding the etcd user's password (first line); keeps it off the command line.")]
OutputOpt = Annotated[OutputFormat, typer.Option("-o", "--output", help="Output format: table or json.")]
EtcdQuotaOpt = Annotated[str, typer.Option("--etcd-quota", envvar="MODELPOOL_ETCD_QUOTA",
                                           help="etcd's --quota-backend-bytes (e.g. 2GiB, 8GiB): warn when the "
                                                "database nears it.")]


def etcd_quota(spec: str) -> int:
    """``--etcd-quota`` in bytes, or exit 2 with the accepted forms."""
    from controlplane.etcdspace import parse_bytes

    try:
        quota = parse_bytes(spec)
    except ValueError as exc:
        fail(f"--etcd-quota: {exc}", ExitCode.USAGE)
    if quota <= 0:
        fail("--etcd-quota must be positive", ExitCode.USAGE)
    return quota


def etcd_config(etcd: str | None, prefix: str | None, cacert: Path | None = None, cert: Path | None = None,
                key: Path | None = None, user: str | None = None, password_file: Path | None = None) -> EtcdConfig:
    """Build the etcd config from flags (env vars are the fallback), or exit 2 with the reason.

    The password comes from ``--etcd-password-file``, else MODELPOOL_ETCD_PASSWORD, else the
    file named by MODELPOOL_ETCD_PASSWORD_FILE; never from a flag of its own.
    """
    if not structlog.is_configured():
        # a one-shot command: library logs (a token renewed, ...) go to stderr, warnings and up,
        # never into the table or JSON on stdout. Daemons configured logging before this.
        configure_command_logging()
    try:
        return EtcdConfig.from_env(etcd, prefix, ca_cert=cacert, client_cert=cert, client_key=key, user=user,
                                   password_file=password_file)
    except EtcdConfigError as exc:
        fail(str(exc), ExitCode.USAGE)


def warn(messages: Iterable[str]) -> None:
    """Print each message as ``warning: message`` to stderr (records a command could not read…)."""
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def fail(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(int(code))


def run_async(fn: Callable[[], Awaitable[T]], *, exit_within_s: float | None = None) -> T:
    """Run a coroutine under uvloop when available; StoreError becomes a clean exit code.

    ``exit_within_s`` (daemons): once ``fn`` has finished, the process exits within that many
    seconds even if library teardown hangs (see ``exit_watchdog``).
    """
    if exit_within_s is not None:
        fn = _with_exit_watchdog(fn, exit_within_s)
    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - non-Linux
        runner = asyncio.run
    try:
        return runner(fn())  # type: ignore[arg-type]
    except StoreError as exc:
        fail(str(exc), exit_code_for(exc))
    raise AssertionError("unreachable")


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code an error ends a command with: etcd unreachable 5, a lost race 4, else 255."""
    from controlplane.store import StoreUnavailable, TxnConflict

    if isinstance(exc, StoreUnavailable):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, TxnConflict):
        return ExitCode.CONFLICT
    return ExitCode.ERROR


def _with_exit_watchdog(fn: Callable[[], Awaitable[T]], within_s: float) -> Callable[[], Awaitable[T]]:
    async def run() -> T:
        code = ExitCode.ERROR
        try:
            result = await fn()
            code = ExitCode.OK
            return result
        except BaseException as exc:
            code = exit_code_for(exc)   # a daemon that could not reach etcd still exits 5, even via the watchdog
            raise
        finally:
            exit_watchdog(within_s, int(code))
    return run


async def open_store(config: EtcdConfig) -> EtcdStore:
    """Connect to etcd for a one-shot command."""
    return await EtcdStore(config).connect()
