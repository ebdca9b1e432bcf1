"""Probe candidate HTTP servers with the edge attacks of issue 9 (a companion of gateway_bench.py).

Each candidate runs the bare proxy of ``bench/server_candidates.py`` (our server, granian's RSGI,
uvicorn with httptools) in front of a canned upstream on loopback; each probe is bounded:

- slow head: a request head trickled one header line every 2 s: closed by the server within
  ``--slow-for`` seconds?
- h2c: ``curl --http2`` GET then POST on one connection: both answered, over one connection?
- no Host on HTTP/1.1: the status;
- keyless 40 MiB body, sent whole before reading (the app answers 401 without reading the body):
  does the client read the 401, or a reset?
- CONNECT followed by a pipelined GET: how many answers?

    python bench/edge_probe.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.netutil import free_port  # noqa: E402
from controlplane.procs import spawn, stop  # noqa: E402
from tests.cluster import wait_http  # noqa: E402

CANNED = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(CANNED), CANNED))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def start(which: str, upstream: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    bindir = Path(sys.executable).parent
    argv = {
        "ours": [sys.executable, "-m", "bench.server_candidates", str(port)],
        "granian-rsgi": [str(bindir / "granian"), "--interface", "rsgi", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning",
                         "bench.server_candidates:rsgi_app"],
        "uvicorn-httptools": [str(bindir / "uvicorn"), "bench.server_candidates:asgi_app", "--host", "127.0.0.1",
                              "--port", str(port), "--http", "httptools", "--loop", "uvloop", "--no-access-log",
                              "--log-level", "warning"],
    }[which]
    env = {**os.environ, "MODELPOOL_BENCH_UPSTREAM": upstream, "PYTHONPATH": str(ROOT)}
    proc = spawn(argv, tmp / f"{which}.log", env=env, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health", proc, log=tmp / f"{which}.log")
    return proc, port


async def slow_head(port: int, seconds: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    try:
        line = 0
        while time.monotonic() - began < seconds:
            try:
                data = await asyncio.wait_for(reader.read(4096), 2.0)
            except TimeoutError:
                line += 1
                writer.write(b"X-Slow-%d: v\r\n" % line)
                continue
            if not data:
                return f"closed after {time.monotonic() - began:.0f} s"
            status = data.split(b"\r\n", 1)[0].decode(errors="replace")
            return f"{status} after {time.monotonic() - began:.0f} s"
    except ConnectionError:
        return f"reset after {time.monotonic() - began:.0f} s"
    finally:
        writer.close()
    return f"still open after {seconds:.0f} s"


def h2c(port: int) -> str:
    if shutil.which("curl") is None:
        return "curl missing"
    url = f"http://127.0.0.1:{port}"
    argv = ["curl", "-sS", "--http2", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}/%{num_connects} ",
            f"{url}/health", "--next", "--http2", "--max-time", "10", "-o", "/dev/null", "-H",
            "Authorization: Bearer x", "-H", "Content-Type: application/json", "-d", '{"model":"m"}',
            "-w", "%{http_code}/%{num_connects}", f"{url}/v1/chat/completions"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return (done.stdout.strip() or "-") + ("" if done.returncode == 0 else f" (curl exit {done.returncode})")


async def one_exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    out += chunk
    finally:
        writer.close()
    return out


def keyless_big(port: int) -> str:
    body = b"x" * (40 << 20)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + body)
            data = s.recv(65536)
    except OSError as exc:
        return f"{type(exc).__name__} while sending/reading"
    return data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow-for", type=float, default=40.0)
    parser.add_argument("--candidates", nargs="+", default=["ours", "granian-rsgi", "uvicorn-httptools"])
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mp-probe-"))

    async def run() -> dict[str, dict[str, str]]:
        server = await asyncio.start_server(_upstream, "127.0.0.1", 0)
        upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        procs = {}
        try:
            for which in args.candidates:
                procs[which] = await asyncio.to_thread(start, which, upstream, tmp)
            slow = await asyncio.gather(*(slow_head(port, args.slow_for) for _, port in procs.values()))
            out: dict[str, dict[str, str]] = {}
            for (which, (_, port)), slow_result in zip(procs.items(), slow, strict=True):
                no_host = await one_exchange(port, b"GET /health HTTP/1.1\r\n\r\n")
                connect = await one_exchange(port, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n"
                                                   b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                out[which] = {
                    "slow head": slow_result,
                    "curl --http2 GET+POST (status/new connections)": await asyncio.to_thread(h2c, port),
                    "no Host": no_host.split(b"\r\n", 1)[0].decode(errors="replace") or "closed",
                    "keyless 40 MiB body": await asyncio.to_thread(keyless_big, port),
                    "CONNECT + GET: answers": str(connect.count(b"HTTP/1.")),
                }
            return out
        finally:
            for proc, _ in procs.values():
                stop(proc, timeout=5)
            server.close()
            await asyncio.sleep(0.5)   # the upstream's handlers see their connections end

    results = asyncio.run(run())
    probes = list(next(iter(results.values())))
    print("\n| probe | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for probe in probes:
        print(f"| {probe} | " + " | ".join(results[w][probe] for w in results) + " |")
    print(json.dumps(results))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
