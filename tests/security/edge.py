"""The harness of the edge security tests: a real `ctl gateway` (auth on) over real sims and etcd.

Everything listens on loopback. ``World`` holds the gateway process, its log, the keys it knows
and the engines behind it; ``raw`` speaks bytes to the gateway so that framing is under test;
``parse_responses`` splits what came back into responses with httptools, so a test sees exactly
how many answers a request got.

To check that a test fails on an older gateway, point ``MODELPOOL_EDGE_GATEWAY_ROOT`` at a
checkout of it: the gateway then runs from that tree, without the flags it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import orjson

from controlplane.keys import Keys, encode_segment
from controlplane.netutil import free_port
from controlplane.pb import ApiKey, ModelAccess, ModelSpec
from controlplane.procs import spawn, stop
from controlplane.store import EtcdConfig, EtcdStore
from gateway.auth import key_hash, new_api_key
from tests.cluster import Sim, instance_record, wait_http

WAIT_S = 10.0
OLD_ROOT = os.environ.get("MODELPOOL_EDGE_GATEWAY_ROOT")   # run an older gateway (see the module docstring)
ENVELOPE = {"message", "type", "param", "code"}
VOLATILE = re.compile(rb'"(id|created)": ("[^"]*"|\d+)')


@dataclass
class Reply:
    """One HTTP response as parsed from the wire."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        want = name.lower().encode()
        return next((v.decode("latin-1") for n, v in self.headers if n.lower() == want), None)

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error object (asserting the envelope's exact shape)."""
        payload = orjson.loads(self.body)
        assert set(payload) == {"error"} and set(payload["error"]) == ENVELOPE, payload
        return dict(payload["error"])


class _Collector:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self._headers, self._body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.replies.append(Reply(self.parser.get_status_code(), self._headers, b"".join(self._body)))


def parse_responses(data: bytes) -> list[Reply]:
    """Every complete response in ``data``, in order (a desynchronised stream shows as extra ones)."""
    c = _Collector()
    c.parser = httptools.HttpResponseParser(c)
    with contextlib.suppress(httptools.HttpParserError):
        c.parser.feed_data(data)
    return c.replies


async def raw(port: int, data: bytes, *, read_for: float = 2.0, until_closed: bool = True,
              source: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a fresh connection and read what comes back until the server closes it
    (or ``read_for`` seconds pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    out = bytearray()
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
            if not until_closed and parse_responses(bytes(out)):
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return bytes(out)


def request_bytes(method: str, path: str, *, key: str | None = None, body: bytes | None = None,
                  headers: Iterable[tuple[str, str]] = (), host: bool = True) -> bytes:
    """An HTTP/1.1 request; a ``body`` gets a Content-Length unless ``headers`` frame it."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host:
        lines.append("Host: gateway")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    extra = list(headers)
    lines += [f"{n}: {v}" for n, v in extra]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in extra):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat_body(model: str, **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}],
                         "max_tokens": 3, **extra})


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the Prometheus sample ``name`` with exactly ``labels`` (0 when absent)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sname, _, rest = series.partition("{")
        if sname == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return 0.0


@dataclass
class World:
    """A gateway process with auth on, its etcd prefix, keys and engines."""

    endpoint: str
    prefix: str
    tmp: Path
    keys: dict[str, str] = field(default_factory=dict)    # name -> API key
    sims: dict[str, list[Sim]] = field(default_factory=dict)
    gateway: Any = None
    port: int = 0
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def store(self) -> EtcdStore:
        return EtcdStore(EtcdConfig(endpoints=(self.endpoint,), prefix=self.prefix))

    async def register(self, model: str, instance_id: str, url: str) -> None:
        store = await self.store().connect()
        try:
            rec = instance_record(model, instance_id, url)
            await store.put(Keys(self.prefix).instance(model, instance_id), rec.SerializeToString())
        finally:
            await store.close()

    async def unregister(self, model: str) -> None:
        store = await self.store().connect()
        try:
            await store.delete(f"{Keys(self.prefix).instances}{encode_segment(model)}/", prefix=True)
        finally:
            await store.close()

    async def routable(self, model: str, key: str = "ann", timeout: float = WAIT_S) -> None:
        """Wait until the gateway routes ``model``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = parse_responses(await raw(self.port, request_bytes("GET", f"/v1/models/{model}",
                                                                     key=self.keys[key]), until_closed=False))
            if got and got[0].status == 200:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"model {model} not routable")

    def log_lines(self) -> list[dict[str, Any]]:
        """The gateway's JSON log lines so far."""
        assert self.log is not None
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_text(self) -> str:
        assert self.log is not None
        return self.log.read_text(errors="replace")


NEW_FLAGS = ("--head-timeout", "--body-timeout", "--write-timeout", "--keepalive-timeout", "--linger-timeout",
             "--body-budget-mb", "--max-connections", "--fd-reserve", "--max-json-depth", "--max-url-kb",
             "--max-headers", "--max-header-kb", "--max-upstream-head-kb")


def gateway_argv(world: World, port: int, flags: Sequence[str]) -> list[str]:
    """`ctl gateway` with auth on; an older gateway (OLD_ROOT) gets only the flags it knows."""
    args = list(flags)
    if OLD_ROOT:
        kept: list[str] = []
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a in NEW_FLAGS:
                skip = True
                continue
            kept.append(a)
        args = kept
    return [sys.executable, "-m", "controlplane.cli.main", "gateway", "--etcd", world.endpoint,
            "--etcd-prefix", world.prefix, "--host", "127.0.0.1", "--port", str(port), *args]


def start_gateway(world: World, flags: Sequence[str] = ()) -> None:
    """Start the world's gateway and wait until it is ready."""
    world.port = free_port()
    world.log = world.tmp / f"gateway-{world.port}.log"
    env = {**os.environ, "MODELPOOL_LOG_FORMAT": "json"}
    world.gateway = spawn(gateway_argv(world, world.port, flags), world.log, env=env,
                          cwd=Path(OLD_ROOT) if OLD_ROOT else None)
    wait_http(f"{world.url}/readyz", world.gateway, log=world.log, timeout=30)


def stop_world(world: World) -> None:
    if world.gateway is not None:
        stop(world.gateway, timeout=10)
    for sims in world.sims.values():
        for s in sims:
            s.stop()


async def seed(world: World) -> None:
    """Keys (ann: any model, bob: only 'pub', lim: 1 request a minute, admin), the private model
    'secret' (owner ann) and 'empty' (in the catalog, no instance)."""
    store = await world.store().connect()
    keys = Keys(world.prefix)
    try:
        spec = ModelSpec(name="secret", engine="sim", access=ModelAccess(public=False, allowed_owners=["ann"]))
        await store.put(keys.model("secret"), spec.SerializeToString())
        await store.put(keys.model("empty"), ModelSpec(name="empty", engine="sim").SerializeToString())
        for name, rec in (("ann", ApiKey(key_id="ann1", owner="ann")),
                          ("bob", ApiKey(key_id="bob1", owner="bob", allowed_models=["pub"])),
                          ("lim", ApiKey(key_id="lim1", owner="lim", requests_per_minute=1)),
                          ("admin", ApiKey(key_id="adm1", owner="ops", admin=True))):
            key = new_api_key()
            world.keys[name] = key
            await store.put(keys.api_key(key_hash(key)), rec.SerializeToString())
        for model, sims in world.sims.items():
            for i, sim in enumerate(sims):
                await store.put(keys.instance(model, f"{model}-{i}"),
                                instance_record(model, f"{model}-{i}", sim.url).SerializeToString())
    finally:
        await store.close()


def new_world(endpoint: str, tmp: Path, sims: dict[str, list[Sim]], flags: Sequence[str]) -> World:
    """Seed etcd, start the gateway, wait until every model routes."""
    world = World(endpoint, f"/mp-sec-{uuid.uuid4().hex[:8]}", tmp, sims=sims)
    try:
        asyncio.run(seed(world))
        start_gateway(world, flags)

        async def all_routable() -> None:
            for model in sims:
                await world.routable(model, "admin")

        asyncio.run(all_routable())
    except BaseException:
        stop_world(world)
        raise
    return world


async def eventually(check: Callable[[], Awaitable[object]], timeout: float = WAIT_S, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what or 'condition'} not reached within {timeout}s (last: {last!r})")


def source_addresses(n: int) -> list[str]:
    """``n`` loopback source addresses, 127.0.0.2 onwards (all of 127/8 is loopback on Linux)."""
    return [f"127.0.0.{2 + i}" for i in range(n)]


def can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


class ScriptedEngine:
    """An engine that answers every request with bytes a test chose (it may misbehave on purpose),
    and records the request heads it received. Runs in the test's event loop, on loopback."""

    def __init__(self, answer: bytes | Callable[[bytes], bytes]) -> None:
        self.answer = answer                     # the bytes, or a function of the request body
        self.heads: list[bytes] = []
        self.closed_by_peer = asyncio.Event()   # the gateway closed a connection it had used
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                writer.write(self.answer(body) if callable(self.answer) else self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
