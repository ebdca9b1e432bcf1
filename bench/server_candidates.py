"""The HTTP servers the gateway's edge could move onto, each as the thinnest possible proxy.

Issue 9 asks to decide the gateway's HTTP server with numbers: keep ``gateway/server.py`` (our
asyncio.Protocol on httptools) or move onto a maintained server. These two apps put the same
upstream client the gateway uses (``gateway.upstream.UpstreamPool``) behind each candidate and do
nothing else (no auth, routing table, SSE tap, metrics or log), so each one measures the floor of
that server's cost per request: if the whole gateway on our server costs less than the bare
proxy on a candidate, moving would only add CPU. The same bare proxy on our own server
(``gateway.server.HttpServer``, every edge limit of it active) is the like-for-like floor.
``bench/gateway_bench.py`` runs them as the targets ``granian-rsgi``, ``uvicorn-httptools`` and
``ours-bare``.

    granian --interface rsgi --loop uvloop --workers 1 bench.server_candidates:rsgi_app
    uvicorn bench.server_candidates:asgi_app --http httptools --loop uvloop --no-access-log
    python -m bench.server_candidates PORT

The upstream (``MODELPOOL_BENCH_UPSTREAM``, e.g. http://127.0.0.1:8000) is the canned-SSE nginx.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import Unauthorized
from gateway.server import HttpServer, Request, Response, Route
from gateway.upstream import UpstreamPool

UPSTREAM = os.environ.get("MODELPOOL_BENCH_UPSTREAM", "http://127.0.0.1:8000")
_UNAUTHORIZED = b'{"error":{"message":"missing API key","type":"authentication_error","param":null,"code":null}}'
_FORWARD = (b"content-type", b"accept")


class _Pool:
    pool: UpstreamPool | None = None

    @classmethod
    def get(cls) -> UpstreamPool:
        if cls.pool is None:
            cls.pool = UpstreamPool()
        return cls.pool


class RsgiProxy:
    """granian's RSGI: read the body, POST it upstream, stream the answer back."""

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.path == "/health":
            proto.response_bytes(200, [("content-type", "text/plain")], b"ok")
            return
        if "authorization" not in scope.headers:   # answered before reading the body, as the gateway does
            proto.response_bytes(401, [("content-type", "application/json")], _UNAUTHORIZED)
            return
        body = await proto()
        headers = [(k.encode(), v.encode()) for k, v in scope.headers.items() if k.encode() in _FORWARD]
        up = await _Pool.get().request(UPSTREAM, scope.path, headers, body, 60.0)
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in up.headers
               if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
        if up.content_length is not None:
            proto.response_bytes(up.status, out, await up.read_all(60.0))
            return
        transport = proto.response_stream(up.status, out)
        while chunk := await up.read_some(60.0):
            await transport.send_bytes(chunk)


rsgi_app = RsgiProxy()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def asgi_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """ASGI (uvicorn with httptools): the same proxy."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if not any(k == b"authorization" for k, _ in scope["headers"]):   # before reading the body
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
        return
    parts = []
    while True:
        msg = await receive()
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    headers = [(k, v) for k, v in scope["headers"] if k in _FORWARD]
    up = await _Pool.get().request(UPSTREAM, scope["path"], headers, b"".join(parts), 60.0)
    out = [(k.lower(), v) for k, v in up.headers if k.lower() not in (b"transfer-encoding", b"connection")]
    await send({"type": "http.response.start", "status": up.status, "headers": out})
    if up.content_length is not None:
        await send({"type": "http.response.body", "body": await up.read_all(60.0)})
        return
    while chunk := await up.read_some(60.0):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


_HOP = (b"content-length", b"transfer-encoding", b"connection", b"date", b"server", b"x-request-id")


async def _ours_proxy(request: Request, response: Response) -> None:
    up = await _Pool.get().request(UPSTREAM, request.path, [(b"Content-Type", b"application/json")], request.body,
                                   60.0)
    headers = [(k, v) for k, v in up.headers if k.lower() not in _HOP]
    if up.content_length is not None:
        response.send(up.status, headers, await up.read_all(60.0))
        return
    response.start(up.status, headers)
    while chunk := await up.read_some(60.0):
        await response.write(chunk)
    response.end()


def _ours_key(request: Request) -> None:
    if request.header(b"authorization") is None:   # at headers-complete, before the body
        raise Unauthorized("missing API key")


async def _ours_health(request: Request, response: Response) -> None:
    response.send(200, [(b"Content-Type", b"text/plain")], b"ok")


async def _serve_ours(port: int) -> None:
    server = HttpServer({"/v1/chat/completions": {"POST": Route(_ours_proxy, admit=_ours_key)},
                         "/health": {"GET": _ours_health}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    await server.start(sock)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve_ours(int(sys.argv[1])))
