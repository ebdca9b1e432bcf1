"""The lean upstream client against real aiohttp servers on free ports."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from gateway.upstream import UpstreamBroken, UpstreamError, UpstreamPool, UpstreamTimeout


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _app(peers: set[tuple[str, int]] | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if peers is not None and request.transport is not None:
            peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.Response(body=b"got:" + body, headers={"X-Seen-Foo": request.headers.get("X-Foo", "")})

    async def stream(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: {i}\n\n".encode())
            if delay:
                await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: 0\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def slow_headers(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (3 * 1024 * 1024))

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/stream", stream)
    app.router.add_post("/cut", cut)
    app.router.add_post("/slow", slow_headers)
    app.router.add_post("/big", big)
    return app


async def test_body_headers_and_keepalive_reuse() -> None:
    peers: set[tuple[str, int]] = set()
    runner, url = await _serve(_app(peers))
    pool = UpstreamPool()
    try:
        for i in range(5):
            resp = await pool.request(url, "/echo", [(b"X-Foo", b"bar"), (b"Content-Type", b"text/plain")],
                                      f"hello {i}".encode(), first_byte_timeout_s=5)
            assert resp.status == 200
            assert (b"X-Seen-Foo", b"bar") in resp.headers
            assert resp.content_length == len(f"got:hello {i}")
            assert await resp.read_all(5) == f"got:hello {i}".encode()
        assert len(peers) == 1  # one connection, reused five times
    finally:
        pool.close()
        await runner.cleanup()


async def test_streaming_chunks_arrive_in_order_and_complete() -> None:
    runner, url = await _serve(_app())
    pool = UpstreamPool()
    try:
        resp = await pool.request(url, "/stream?n=20&delay=0.005", [], b"{}", first_byte_timeout_s=5)
        assert resp.chunked and resp.content_length is None
        body = await resp.read_all(5)
        assert body == b"".join(f"data: {i}\n\n".encode() for i in range(20)) + b"data: [DONE]\n\n"
        assert resp.released
    finally:
        pool.close()
        await runner.cleanup()


async def test_concurrent_requests_use_separate_connections() -> None:
    peers: set[tuple[str, int]] = set()
    runner, url = await _serve(_app(peers))
    pool = UpstreamPool()
    try:
        async def one(i: int) -> bytes:
            resp = await pool.request(url, "/echo", [], str(i).encode(), first_byte_timeout_s=5)
            return await resp.read_all(5)

        out = await asyncio.gather(*(one(i) for i in range(20)))
        assert out == [f"got:{i}".encode() for i in range(20)]
        assert 1 < len(peers) <= 20
    finally:
        pool.close()
        await runner.cleanup()


async def test_connection_refused_is_an_upstream_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = UpstreamPool()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request(f"http://127.0.0.1:{port}", "/x", [], b"{}", first_byte_timeout_s=5)


async def test_first_byte_and_stall_timeouts() -> None:
    runner, url = await _serve(_app())
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamTimeout):
            await pool.request(url, "/slow", [], b"{}", first_byte_timeout_s=0.2)
        resp = await pool.request(url, "/stream?n=3&delay=1", [], b"{}", first_byte_timeout_s=5)
        assert await resp.read_some(2) == b"data: 0\n\n"
        with pytest.raises(UpstreamTimeout):
            await resp.read_some(0.2)
        resp.close()
    finally:
        pool.close()
        await runner.cleanup()


async def test_upstream_cut_mid_stream_is_broken_not_complete() -> None:
    runner, url = await _serve(_app())
    pool = UpstreamPool()
    try:
        resp = await pool.request(url, "/cut", [], b"{}", first_byte_timeout_s=5)
        assert await resp.read_some(5) == b"data: 0\n\n"
        with pytest.raises(UpstreamBroken):
            await resp.read_some(5)
    finally:
        pool.close()
        await runner.cleanup()


async def test_stale_idle_connection_is_replaced_transparently() -> None:
    runner, url = await _serve(_app())
    pool = UpstreamPool()
    try:
        resp = await pool.request(url, "/echo", [], b"a", first_byte_timeout_s=5)
        assert await resp.read_all(5) == b"got:a"
        # Restart the server on the same port: the pooled connection is now dead.
        port = int(url.rsplit(":", 1)[1])
        await runner.cleanup()
        runner2 = web.AppRunner(_app())
        await runner2.setup()
        await web.TCPSite(runner2, "127.0.0.1", port).start()
        try:
            resp = await pool.request(url, "/echo", [], b"b", first_byte_timeout_s=5)
            assert await resp.read_all(5) == b"got:b"
        finally:
            await runner2.cleanup()
    finally:
        pool.close()


async def test_large_body_with_flow_control() -> None:
    runner, url = await _serve(_app())
    pool = UpstreamPool()
    try:
        resp = await pool.request(url, "/big", [], b"{}", first_byte_timeout_s=5)
        total = 0
        while chunk := await resp.read_some(5):
            total += len(chunk)
            await asyncio.sleep(0)  # a slow consumer
        assert total == 3 * 1024 * 1024
    finally:
        pool.close()
        await runner.cleanup()
