"""Requests/s of the gateway's upstream client (gateway/upstream.py) against aiohttp's client.

Both clients POST a chat request and read a canned 64-event SSE answer (Content-Length) from the
same minimal in-process asyncio server, 32 concurrent workers, on one uvloop loop, alternating
runs. The server costs the same for both, so the ratio is the clients' per-request cost:

    python bench/upstream_client_bench.py --requests 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.upstream import UpstreamPool

BODY = b"".join(b'data: {"id":"x","choices":[{"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(64))
BODY += b"data: [DONE]\n\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
REQUEST = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


class _Canned(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:  # requests are small: one read each
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


async def _aiohttp_client(url: str, total: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False) as session:
        async def worker(n: int) -> None:
            for _ in range(n):
                async with session.post(url + "/v1/chat/completions", data=REQUEST,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


async def _upstream_pool(url: str, total: int, concurrency: int) -> float:
    pool = UpstreamPool()

    async def worker(n: int) -> None:
        for _ in range(n):
            r = await pool.request(url, "/v1/chat/completions", [(b"Content-Type", b"application/json")], REQUEST, 5)
            await r.read_all(5)

    started = time.perf_counter()
    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    pool.close()
    return total / (time.perf_counter() - started)


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Canned, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    rows: dict[str, list[float]] = {"aiohttp ClientSession": [], "gateway.upstream.UpstreamPool": []}
    for _ in range(args.rounds):
        rows["aiohttp ClientSession"].append(await _aiohttp_client(url, args.requests, args.concurrency))
        rows["gateway.upstream.UpstreamPool"].append(await _upstream_pool(url, args.requests, args.concurrency))
    server.close()
    for name, rates in rows.items():
        print(f"{name:32s} " + "  ".join(f"{r:8.0f}" for r in rates) + "  req/s")
    base = max(rows["aiohttp ClientSession"])
    print(f"ratio (best of each): {max(rows['gateway.upstream.UpstreamPool']) / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
