"""The floor of a Python data path: a raw asyncio.Protocol HTTP/1.1 server (httptools) in front of
gateway/upstream.py, with none of the gateway's work (no auth, routing, limits, usage, metrics,
logs, error envelopes, disconnect handling). Not a product: a measurement of what the aiohttp
server path costs, for docs/gateway-bench.md.

    python bench/gateway_bench.py --upstream static --targets direct vllm-router --hold 60 &
    python bench/prototypes/raw_proxy.py 18920 <direct url> &   # run it twice: two processes, one port
    python bench/prototypes/raw_proxy.py 18920 <direct url> &
    wrk -t1 -c32 -d4s -s post.lua http://127.0.0.1:18920/v1/chat/completions
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.upstream import UpstreamPool

HEADERS = [(b"Content-Type", b"application/json")]


class Connection(asyncio.Protocol):
    """One client connection; requests are answered in order (no pipelining of handlers)."""

    def __init__(self, pool: UpstreamPool, upstream: str) -> None:
        self.pool, self.upstream = pool, upstream
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body = b"", b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        url, body, self.url, self.body = self.url, self.body, b"", b""
        asyncio.get_running_loop().create_task(self.answer(url.decode(), body))

    async def answer(self, path: str, body: bytes) -> None:
        up = await self.pool.request(self.upstream, path, HEADERS, body, 60)
        if self.transport.is_closing():  # the load generator hung up (end of a wrk run)
            up.close()
            return
        if up.content_length is not None:
            data = await up.read_all(60)
            self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
                                 % (up.status, len(data)) + data)
            return
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             % up.status)
        while chunk := await up.read_some(60):
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.transport.write(b"0\r\n\r\n")


async def main(port: int, upstream: str) -> None:
    pool = UpstreamPool()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    await asyncio.get_running_loop().create_server(lambda: Connection(pool, upstream), sock=sock)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
