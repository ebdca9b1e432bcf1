"""A lean HTTP/1.1 client for the data path: keep-alive connection pools parsed with httptools.

The gateway sends one kind of request upstream — a POST with a body already in memory — and
relays the answer byte for byte. A general client (aiohttp's) spends most of its per-request time
on things this path never needs (cookie jars, tracing, redirects, a multidict per response,
decompression), so the data path uses this one instead:

    UpstreamPool.request(url, path, headers, body)
        │ idle keep-alive connection to host:port (or a new one; connect timeout)
        ▼
    Connection (asyncio.Protocol) ── one write: request line + headers + body
        │ httptools parses status/headers, de-chunks the body
        ▼
    UpstreamResponse: status, headers, content_length, read_some(timeout), read_all(timeout)

Bounds on what an engine sends (a misbehaving or compromised engine must not reach the client
through us): a response head over ``MAX_HEAD_BYTES`` fails the request (502); bytes past the end
of a response (beyond its Content-Length, or a second response nobody asked for) are dropped and
the connection closed, never reused; 1xx interim responses are skipped (RFC 9110 15.2) and a
``101 Switching Protocols`` is refused; trailers of a chunked response are read and dropped.

Flow control: the connection stops reading from the socket while more than ``HIGH_WATER`` bytes
wait for the client, and resumes when the gateway has written them. A connection goes back to
the pool only when its response was read to the end and both sides allow keep-alive; anything
else (client gone, stall, parse error) closes it, so the engine sees the disconnect and stops
generating. A reused idle connection that the engine closed in the meantime fails before any
response byte; ``request`` then retries once on a fresh connection (the request never reached
an engine that could act on it).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024   # buffered response bytes before the socket is paused
MAX_IDLE_PER_HOST = 256   # idle keep-alive connections kept per upstream
MAX_HEAD_BYTES = 64 * 1024   # an engine's response head
MAX_INTERIM = 8              # 1xx interim responses before the final one


class UpstreamError(Exception):
    """The upstream could not be reached or broke before its response headers arrived.

    ``sent`` is False when the request cannot have reached the engine (the connection was never
    made): such a failure is the instance's, whatever the request held.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connecting, waiting for the response headers or for the next body bytes took too long."""


class UpstreamBroken(Exception):
    """The response body ended early or could not be parsed (after the headers arrived)."""


class _Connection(asyncio.Protocol):
    """One keep-alive TCP connection; serves one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.max_head_bytes = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._response: UpstreamResponse | None = None
        self._headers_waiter: asyncio.Future[None] | None = None
        self._header_list: list[tuple[bytes, bytes]] = []
        self._got_bytes = False
        self._head_bytes = 0        # of the current response's heads, interim ones included
        self._in_head = False       # a request was sent and its (final) head is not complete yet
        self._interim = False       # the message being parsed is a 1xx interim response
        self._interims = 0
        self._excess = False        # bytes arrived that belong to no request: the connection is spent

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._excess:
            return
        if self._response is None:   # bytes on an idle connection belong to no request: it is spent
            self._excess = True
            self.close()
            return
        in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("upstream tried to upgrade the connection"))
            return
        except httptools.HttpParserError as exc:
            stop = exc.__context__
            if self._excess:   # a complete response is followed by bytes nobody asked for: drop them
                self._spent()
            elif isinstance(stop, _Stop):
                self._fail(stop.error)
            else:
                self._fail(UpstreamBroken(f"malformed HTTP response: {exc}"))
            return
        if in_head:   # bound what a head may take, without counting per header in the common case
            if self._in_head:   # still unfinished: all of these bytes were head
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head_bytes:
                    self._fail(UpstreamBroken(f"response head over {self.max_head_bytes} bytes"))
            elif self._head_bytes + len(data) > self.max_head_bytes and self._response is not None:
                # the head ended in a large read: measure it exactly
                size = sum(len(n) + len(v) + 4 for n, v in self._response.headers)
                if size > self.max_head_bytes:
                    self._fail(UpstreamBroken(f"response head over {self.max_head_bytes} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self._response
        if resp is not None and not resp.complete:
            if resp.headers_received:
                # No Content-Length and no chunking: the body ends with the connection.
                if resp.content_length is None and not resp.chunked:
                    resp._finish()
                else:
                    resp._fail(UpstreamBroken("upstream closed the connection mid-response"))
            else:
                self._fail(UpstreamError("connection closed before the response"
                                         + (f": {exc}" if exc else "")))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        resp = self._response
        if resp is None or resp.complete:
            # bytes past the end of the response (beyond its Content-Length, or to no request): they
            # must never reach a client. Stop parsing; the connection is not reused.
            self._excess = True
            raise _Stop(UpstreamBroken("bytes past the end of the response"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:   # (trailers of a chunked response are dropped, never headers)
            self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self._response
        if resp is None:
            return
        self._in_head = False
        status = self._parser.get_status_code()
        if status == 101:   # an engine must not switch protocols on a proxied request: 502
            raise _Stop(UpstreamBroken("upstream answered 101 Switching Protocols; refused"))
        if 100 <= status < 200:
            self._interim = True       # 100 Continue, 103 Early Hints: skipped, the final answer follows
            self._interims += 1
            if self._interims > MAX_INTERIM:
                raise _Stop(UpstreamBroken(f"more than {MAX_INTERIM} interim (1xx) responses"))
            self._header_list = []
            self._in_head = True
            return
        resp.status = status
        resp.headers = self._header_list
        for name, value in self._header_list:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    resp.content_length = int(value)
                except ValueError:
                    self._fail(UpstreamBroken(f"bad Content-Length {value!r}"))
                    return
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                resp.chunked = True
        resp.headers_received = True
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self._response
        if resp is not None:
            resp.keep_alive = self._parser.should_keep_alive()
            resp._finish()

    def _spent(self) -> None:
        """Close the connection without failing a response that already completed."""
        resp = self._response
        if resp is not None:
            resp.keep_alive = False
        self.close()

    # -- request ---------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc if not isinstance(exc, UpstreamBroken) else UpstreamError(str(exc)))
        if self._response is not None and self._response.headers_received:
            self._response._fail(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, payload: bytes, response: UpstreamResponse, body: bytes = b"") -> asyncio.Future[None]:
        """Write the request; the returned future resolves when the response headers are in."""
        assert self.transport is not None
        # One parser per connection: llhttp starts over after each complete keep-alive response,
        # and a connection whose response did not complete is closed, never reused.
        self._header_list = []
        self._got_bytes = False
        self._head_bytes = self._interims = 0
        self._in_head = True
        self._response = response
        self._headers_waiter = self.loop.create_future()
        self.transport.write(payload)
        if body:
            self.transport.write(body)
        return self._headers_waiter

    @property
    def got_bytes(self) -> bool:
        """Whether any byte of the current response arrived."""
        return self._got_bytes


class _Stop(Exception):
    """Raised from a parser callback to stop parsing what an engine must not send."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class UpstreamResponse:
    """Status, raw headers and a readable body of one upstream answer."""

    __slots__ = ("_buffer", "_buffered", "_conn", "_error", "_key", "_pool", "_waiter", "chunked",
                 "complete", "content_length", "headers", "headers_received", "keep_alive", "released", "status")

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.headers_received = False
        self.complete = False
        self.keep_alive = False
        self.released = False
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn.transport is not None:
            self._conn.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # used by the gateway
    async def read_some(self, timeout: float) -> bytes:
        """Every body byte buffered now (waiting up to ``timeout`` s for some); b"" at the end."""
        if not self._buffer and not self.complete and self._error is None:
            loop = self._conn.loop
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._buffer:
            data = self._buffer.popleft() if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            if self._buffered > HIGH_WATER and self._conn.transport is not None:
                self._conn.transport.resume_reading()
            self._buffered = 0
            return data
        if self._error is not None:
            raise self._error
        if self.complete:
            self.release()
            return b""
        raise UpstreamTimeout(f"no response bytes for {timeout:g} s")

    async def read_all(self, timeout: float) -> bytes:
        """The whole body; ``timeout`` applies to each silence between bytes."""
        parts: list[bytes] = []
        while chunk := await self.read_some(timeout):
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: reuse the connection if it ended cleanly, else close it."""
        if self.released:
            return
        self.released = True
        conn = self._conn
        conn._response = None
        if self.complete and self.keep_alive and self._error is None and not conn.closed:
            self._pool._put_idle(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response and its connection (the engine sees the disconnect)."""
        if not self.released:
            self.released = True
            self._conn._response = None
            self._conn.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)  # read_some sees no data and raises UpstreamTimeout


class UpstreamPool:
    """Keep-alive connections per upstream ``host:port``; one per in-flight request."""

    def __init__(self, connect_timeout_s: float = 5.0, max_idle_per_host: int = MAX_IDLE_PER_HOST,
                 max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_head_bytes = max_head_bytes
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._hosts: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._closed = False

    def _target(self, base_url: str) -> tuple[tuple[str, int], bytes]:
        hit = self._hosts.get(base_url)
        if hit is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"unsupported upstream URL {base_url!r} (plain http://host:port only)")
            port = parts.port or 80
            host_header = parts.netloc.encode("idna" if not parts.netloc.isascii() else "ascii")
            hit = ((parts.hostname, port), host_header)
            if len(self._hosts) > 4096:
                self._hosts.clear()
            self._hosts[base_url] = hit
        return hit

    async def request(self, base_url: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes,
                      first_byte_timeout_s: float) -> UpstreamResponse:
        """POST ``body`` to ``base_url + path``; returns once the response headers arrived."""
        key, host = self._target(base_url)
        head = [b"POST ", path.encode("ascii"), b" HTTP/1.1\r\nHost: ", host,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        # one write for a small request; a large body is written as it is (no copy of it)
        payload, rest = (b"".join(head) + body, b"") if len(body) <= 65536 else (b"".join(head), body)
        for _ in range(2):
            conn, reused = await self._get(key)
            response = UpstreamResponse(self, key, conn)
            waiter = conn.start(payload, response, rest)
            timer = conn.loop.call_later(first_byte_timeout_s, _expire, waiter)
            try:
                await waiter
            except UpstreamError:
                response.close()
                if reused and not conn.got_bytes:
                    continue  # the engine had closed this idle connection; try a fresh one
                raise
            except BaseException:
                response.close()
                raise
            finally:
                timer.cancel()
            if not response.headers_received:
                response.close()
                raise UpstreamTimeout(f"no response headers within {first_byte_timeout_s:g} s")
            return response
        raise UpstreamError("upstream closed the connection before answering")

    async def _get(self, key: tuple[str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop, self.max_head_bytes),
                                                       key[0], key[1])
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {key[0]}:{key[1]} took over {self.connect_timeout_s:g} s",
                                  sent=False) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}", sent=False) from None
        return conn, False

    def _put_idle(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            conn.close()
        else:
            idle.append(conn)

    def close(self) -> None:
        """Close every idle connection; in-flight ones close when their responses end."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
