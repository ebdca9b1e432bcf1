"""How to reach etcd: endpoints, key prefix, TLS/mTLS and user/password.

Read from flags, falling back to environment variables:

    MODELPOOL_ETCD           comma-separated endpoints, e.g. "https://e1:2379,https://e2:2379"
    MODELPOOL_ETCD_PREFIX    key prefix (default "/modelpool")
    MODELPOOL_ETCD_CACERT    CA certificate (PEM file) — enables TLS
    MODELPOOL_ETCD_CERT      client certificate (PEM file) — mTLS
    MODELPOOL_ETCD_KEY       client private key (PEM file) — mTLS
    MODELPOOL_ETCD_USER      etcd user name (password in MODELPOOL_ETCD_PASSWORD)
    MODELPOOL_ETCD_PASSWORD  the etcd user's password
    MODELPOOL_ETCD_PASSWORD_FILE  a file holding that password (first line; what sbatch jobs and
                             Kubernetes Secrets use, so the password is never on a command line)
    MODELPOOL_ETCD_TLS_SERVER_NAME   name to verify in the server certificate
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "127.0.0.1:2379"
DEFAULT_PREFIX = "/modelpool"


class EtcdConfigError(ValueError):
    """An etcd setting is malformed (bad endpoint, unreadable certificate, …)."""


def parse_endpoint(raw: str) -> tuple[str, int, bool]:
    """Split ``[http[s]://]host[:port]`` into (host, port, tls_requested)."""
    text = raw.strip()
    if not text:
        raise EtcdConfigError("empty etcd endpoint")
    tls = text.startswith("https://")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise EtcdConfigError(f"etcd endpoint {raw!r}: scheme must be http or https")
    if not parts.hostname:
        raise EtcdConfigError(f"etcd endpoint {raw!r}: no host")
    try:
        port = parts.port or 2379
    except ValueError as exc:
        raise EtcdConfigError(f"etcd endpoint {raw!r}: bad port") from exc
    return parts.hostname, port, tls


@dataclass(frozen=True)
class EtcdConfig:
    """Connection settings for one etcd cluster."""

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    prefix: str = DEFAULT_PREFIX
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise EtcdConfigError("at least one etcd endpoint is needed")
        for ep in self.endpoints:
            parse_endpoint(ep)
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise EtcdConfigError(f"etcd prefix {self.prefix!r} must start and not end with '/'")
        if (self.client_cert is None) != (self.client_key is None):
            raise EtcdConfigError("mTLS needs both a client certificate and a client key")
        if self.client_cert is not None and self.ca_cert is None:
            raise EtcdConfigError("mTLS needs a CA certificate too (--etcd-cacert)")
        if self.user is not None and self.password is None:
            raise EtcdConfigError(f"etcd user and password go together: no password for etcd user {self.user!r} "
                                  "(set MODELPOOL_ETCD_PASSWORD, or --etcd-password-file / "
                                  "MODELPOOL_ETCD_PASSWORD_FILE)")
        if self.user is None and self.password is not None:
            raise EtcdConfigError("etcd user and password go together: a password was given without "
                                  "--etcd-user / MODELPOOL_ETCD_USER")

    @property
    def tls(self) -> bool:
        """Whether connections use TLS (a CA certificate is configured)."""
        return self.ca_cert is not None

    @classmethod
    def from_env(cls, endpoints: str | None = None, prefix: str | None = None, **overrides: object) -> EtcdConfig:
        """Build a config from explicit values, falling back to MODELPOOL_ETCD* variables."""
        env = os.environ
        raw = endpoints or env.get("MODELPOOL_ETCD") or DEFAULT_ENDPOINT
        eps = tuple(e.strip() for e in raw.split(",") if e.strip())

        def path(name: str, key: str) -> Path | None:
            value = overrides.get(name) or env.get(key)
            return Path(str(value)) if value else None

        user = overrides.get("user") or env.get("MODELPOOL_ETCD_USER")
        password = overrides.get("password")
        file_flag = overrides.get("password_file")
        if not password and file_flag:  # an explicit --etcd-password-file wins over the environment
            password = read_password_file(Path(str(file_flag)))
        password = password or env.get("MODELPOOL_ETCD_PASSWORD")
        if not password and env.get("MODELPOOL_ETCD_PASSWORD_FILE"):
            password = read_password_file(Path(env["MODELPOOL_ETCD_PASSWORD_FILE"]))
        server_name = overrides.get("tls_server_name") or env.get("MODELPOOL_ETCD_TLS_SERVER_NAME")
        timeout = overrides.get("timeout_s")
        return cls(
            endpoints=eps,
            prefix=prefix or env.get("MODELPOOL_ETCD_PREFIX") or DEFAULT_PREFIX,
            ca_cert=path("ca_cert", "MODELPOOL_ETCD_CACERT"),
            client_cert=path("client_cert", "MODELPOOL_ETCD_CERT"),
            client_key=path("client_key", "MODELPOOL_ETCD_KEY"),
            user=str(user) if user else None,
            password=str(password) if password else None,
            tls_server_name=str(server_name) if server_name else None,
            timeout_s=float(timeout) if isinstance(timeout, int | float) else 5.0,
        )

    def with_credentials(self, user: str | None, password: str | None) -> EtcdConfig:
        """The same connection as another etcd user (or none)."""
        return dataclasses.replace(self, user=user, password=password)

    def read_tls_material(self) -> dict[str, bytes]:
        """Load the PEM files for the gRPC channel; raises EtcdConfigError when unreadable."""
        out: dict[str, bytes] = {}
        for arg, p in (("ca_cert", self.ca_cert), ("cert_chain", self.client_cert), ("cert_key", self.client_key)):
            if p is None:
                continue
            try:
                out[arg] = p.read_bytes()
            except OSError as exc:
                raise EtcdConfigError(f"cannot read {arg.replace('_', ' ')} {p}: {exc.strerror}") from exc
        return out


MAX_PASSWORD_FILE_BYTES = 4096


def read_password_file(path: Path) -> str:
    """The password in ``path``: its first line, without the line end (EtcdConfigError when the
    file is unreadable, empty or larger than 4 KiB: not a password file)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise EtcdConfigError(f"cannot read etcd password file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_PASSWORD_FILE_BYTES:
        raise EtcdConfigError(f"etcd password file {path} is larger than {MAX_PASSWORD_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EtcdConfigError(f"etcd password file {path} is not UTF-8 text") from exc
    password = text.splitlines()[0] if text.splitlines() else ""
    if not password:
        raise EtcdConfigError(f"etcd password file {path} is empty")
    return password
