"""Requests, responses and routes of the gateway's HTTP/1.1 server (``gateway.server``).

A ``Route`` is a handler plus what the server may decide before the body arrives: ``admit``
runs when the request head is complete (the gateway checks the API key there, so a keyless
request is answered 401 before one body byte is buffered), and ``body=False`` routes never
buffer a body at all (it is read and discarded).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING

import orjson

from gateway.errors import GatewayError, error_body

if TYPE_CHECKING:
    from gateway.server import HttpConnection

Headers = list[tuple[bytes, bytes]]
Handler = Callable[["Request", "Response"], Awaitable[None]]
#: Runs at headers-complete; raises GatewayError to answer before the body. Its result is ``request.context``.
Admit = Callable[["Request"], object]

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_JSON = (b"Content-Type", b"application/json")


@dataclass(frozen=True, slots=True)
class Route:
    """A handler and what is decided before its request's body is read."""

    handler: Handler
    admit: Admit | None = None
    body: bool = True     # False: a body sent anyway is read and discarded, never buffered


class Request:
    """One parsed request: method, path, raw headers (names as sent) and the whole body."""

    __slots__ = ("_body_done", "_body_parts", "_index", "body", "body_size", "complete", "context", "error",
                 "expect_continue", "has_body", "headers", "http10", "id", "keep_alive", "method", "path", "query",
                 "rejected", "route")

    def __init__(self, method: str, url: bytes, headers: Headers, http10: bool, keep_alive: bool) -> None:
        path, _, query = url.partition(b"?")
        self.method = method
        self.path = path.decode("latin-1")
        self.query = query
        self.headers = headers
        self.http10 = http10
        self.keep_alive = keep_alive
        self.body = b""
        self.body_size = 0            # bytes buffered (counted in the server's body budget)
        self.complete = False
        self.has_body = False         # a Content-Length over 0 or a chunked body follows the head
        self.id = ""
        self.route: Route | None = None
        self.context: object = None   # what the route's admit check returned (the caller's principal)
        self.rejected = False         # answered with ``error`` without reading (the rest of) its body
        self.error: GatewayError | None = None
        self._body_parts: list[bytes] = []
        self._body_done: asyncio.Future[None] | None = None
        self._index: dict[bytes, bytes] = {}
        for name, value in headers:
            self._index.setdefault(name.lower(), value)
        self.expect_continue = self._index.get(b"expect", b"").lower() == b"100-continue"

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower-case bytes), decoded; None when absent."""
        value = self._index.get(name)
        return value.decode("latin-1") if value is not None else None

    async def read_body(self) -> None:
        """Wait until the body is complete, or the request failed (``error``)."""
        while not (self.complete or self.error):
            self._body_done = asyncio.get_running_loop().create_future()
            await self._body_done

    def _finish_body(self) -> None:
        parts = self._body_parts
        self.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body_parts = []
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._body_done is not None and not self._body_done.done():
            self._body_done.set_result(None)


class Response:
    """Writes one response on its connection: ``send`` a whole one, or ``start``/``write``/``end``."""

    __slots__ = ("_bodyless", "_chunked", "_conn", "_request", "ended", "logged", "started", "status")

    def __init__(self, conn: HttpConnection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._chunked = False
        self._bodyless = request.method == "HEAD"   # headers as GET would send them, never a body
        self.status = 0
        self.started = False
        self.ended = False
        self.logged = False    # the handler logs this request's outcome itself (the access log)

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]], length: int | None) -> list[bytes]:
        conn, req = self._conn, self._request
        self.status = status
        self.started = True
        # While closing, the last queued request gets Connection: close (earlier pipelined ones are
        # still answered); a response of unknown length to HTTP/1.0 ends with the connection.
        keep = (req.keep_alive and not (conn.closing and len(conn._queue) <= 1)
                and (length is not None or not req.http10))
        conn.keep_alive = keep
        out = [b"HTTP/1.1 %d %s\r\nDate: %s\r\nX-Request-Id: %s\r\n" % (
            status, _REASONS.get(status, b"Unknown"), _http_date(), req.id.encode("latin-1"))]
        for name, value in headers:
            out.append(b"%s: %s\r\n" % (name, value))
        if length is not None:
            out.append(b"Content-Length: %d\r\n" % length)
        elif not req.http10:
            self._chunked = not self._bodyless
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not keep:
            out.append(b"Connection: close\r\n")
        elif req.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return out

    def send(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole response at once."""
        out = self._head(status, headers, len(body))
        if not self._bodyless:
            out.append(body)
        self.ended = True
        self._conn.write(b"".join(out))

    def send_json(self, status: int, payload: object, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """``payload`` as a JSON response."""
        self.send(status, [_JSON, *headers], orjson.dumps(payload))

    def send_error(self, err: GatewayError) -> None:
        """A GatewayError in the OpenAI envelope."""
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
        self.send(err.status, [_JSON, *extra], error_body(err.message, err.type, err.param, err.code))

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]], length: int | None = None) -> None:
        """Send the status line and headers; the body follows with ``write`` and ``end``."""
        self._conn.write(b"".join(self._head(status, headers, length)))

    async def write(self, data: bytes) -> None:
        """Send body bytes, waiting while the client reads slower than we write."""
        if self._bodyless:
            return
        if self._chunked:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._conn.write(data)
        if self._conn.write_paused:
            await self._conn.drained()

    def end(self) -> None:
        """The body is complete."""
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self.ended = True

    def abort(self) -> None:
        """Cut the connection: the client must not mistake a broken answer for a whole one."""
        self._conn.keep_alive = False
        self._conn.abort()


class _RequestIds:
    """32 hex digits: 16 random per process, then a counter (unique without a syscall per request)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # gateway workers are forked

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()

_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
