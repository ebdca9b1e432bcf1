"""The data path: forward one OpenAI request to an instance and stream the answer back unchanged.

    body ─▶ model ─▶ auth/access ─▶ pick(READY, in-flight) ─▶ POST upstream
                                           ▲                      │ connect error / 5xx,
                                           └── another instance ◀─┘ nothing sent to the client yet
                                              (a 5xx or a broken answer is retried once: if the
                                               second instance fails the same body too, the body
                                               is the cause: nothing is ejected, no third try;
                                               gateway.ejection)
                                                                   │
                                            first byte ─▶ stream chunks through as they arrive

The client sees exactly what the engine answered to the client's own body: upstream bytes are
passed through undecoded (``gateway.upstream`` never decompresses or re-frames them), so SSE
framing, ``data: [DONE]``, ``usage`` and every other field arrive as the engine wrote them. The
one exception is invisible by construction: for a stream that did not ask for usage the gateway
asks the engine for it (``sse.with_usage_requested``) and the ``StreamTap`` removes exactly that
usage event again.

Once the first byte has been sent the request is committed to that instance; a client that goes
away cancels the handler (``gateway.server``), which closes the upstream connection so the engine
stops generating. Headers stay bytes from the client's socket to the engine's and back.

What the data path learns (instance, status, usage, TTFT, gaps) lands in the request's
``Exchange``; the hot loop only feeds chunks to the tap (byte scans, no JSON).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
import structlog

from gateway.edge import MAX_JSON_DEPTH, json_depth_within
from gateway.ejection import Attribution
from gateway.errors import BadRequest, GatewayError, NoCapacity, UpstreamFailed, UpstreamTimeout, as_envelope
from gateway.routing import pick_affinity
from gateway.server import Headers, Request, Response
from gateway.sse import StreamTap, TokenUsage, fallback_usage, usage_from_body, usage_from_tail
from gateway.table import Endpoint
from gateway.upstream import UpstreamBroken, UpstreamError, UpstreamPool, UpstreamResponse
from gateway.upstream import UpstreamTimeout as UpstreamTimeoutError

log = structlog.get_logger(__name__)

# Never forwarded upstream: hop-by-hop headers, our own credentials, what the upstream client sets
# itself, and the request id (sent as ours: the client's own when it gave one).
DROP_REQUEST_HEADERS = frozenset(h.lower().encode() for h in (
    "Host", "Connection", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Content-Length", "Authorization", "Cookie", "Expect", "X-Request-Id",
    "HTTP2-Settings",
))
# Never passed back to the client: hop-by-hop headers and what our server sets itself.
DROP_RESPONSE_HEADERS = frozenset(h.lower().encode() for h in (
    "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Date", "Server", "Trailer", "Upgrade",
    "X-Request-Id",
))

# (instance, reason for a failure or None for a success, the request's sequence number: ejection
# counts failures of distinct requests)
OnResult = Callable[[Endpoint, str | None, int], None]
TAIL_BYTES = 64 * 1024   # kept of a large non-SSE body to find its usage at the end
WHOLE_BYTES = 1 << 20    # answers up to this size (and engines' errors, cut here) are read whole


@dataclass(slots=True)
class Exchange:
    """One request as the data path saw it; filled in by ``Forwarder.forward``."""

    started: float
    session: str | None = None           # affinity key (X-Session-Id)
    strip_usage: bool = False            # we asked the engine for usage the client did not ask for
    token_field: str = "content"         # the JSON field of generated text in stream events (sse.TOKEN_FIELDS)
    request_bytes: int = 0               # the client's body size (prompt estimate when an engine reports no usage)
    extra_headers: Mapping[str, str] | None = None   # added to the client's response (rate limits)
    instance_id: str = ""
    usage: TokenUsage | None = None
    tap: StreamTap | None = None
    completed: bool = False


@dataclass(frozen=True)
class ProxySettings:
    """Retry and timeout policy of the data path."""

    max_attempts: int = 3            # instances tried per request before giving up (before the first byte)
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 600.0   # engine queueing + prefill can be long
    stall_timeout_s: float = 300.0   # max silence between chunks of a stream (no total cap)


def parse_model(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, dict[str, object]]:
    """The request's ``model`` and parsed JSON; BadRequest with a precise reason otherwise."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    # no more brackets than the bound: it cannot nest deeper (two byte counts decide almost every body)
    if body.count(b"[") + body.count(b"{") > max_depth and not json_depth_within(body, payload, max_depth):
        raise BadRequest(f"request body nests deeper than {max_depth} levels")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    return model, payload


def upstream_headers(request: Request) -> Headers:
    """The client's headers minus hop-by-hop ones (those its Connection names too) and
    credentials, plus the request id."""
    drop = DROP_REQUEST_HEADERS
    named = request._index.get(b"connection")
    if named and named.lower() not in (b"keep-alive", b"close"):
        drop = drop | {t.strip().lower() for t in named.split(b",")}
    out = [(name, value) for name, value in request.headers if name.lower() not in drop]
    out.append((b"X-Request-Id", request.id.encode("latin-1")))
    return out


def response_headers(raw: Headers, extra: Mapping[str, str] | None) -> tuple[Headers, bool]:
    """The engine's response headers for the client (hop-by-hop ones dropped) and whether it is SSE.

    The server adds the request id, Date, and the framing (Content-Length or chunked) itself.
    """
    headers: Headers = []
    sse = False
    for name, value in raw:
        lname = name.lower()
        if lname in DROP_RESPONSE_HEADERS:
            continue
        if lname == b"content-type" and value.startswith(b"text/event-stream"):
            sse = True
        headers.append((name, value))
    if extra:
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
    return headers, sse


class InFlight:
    """Outstanding requests per instance, as this gateway process sees them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.total = 0

    def acquire(self, ep: Endpoint) -> None:
        self.counts[ep.instance_id] = self.counts.get(ep.instance_id, 0) + 1
        self.total += 1

    def release(self, ep: Endpoint) -> None:
        left = self.counts.get(ep.instance_id, 1) - 1
        if left <= 0:
            self.counts.pop(ep.instance_id, None)
        else:
            self.counts[ep.instance_id] = left
        self.total -= 1


class Forwarder:
    """Sends requests upstream with retries before the first byte, over one keep-alive pool."""

    def __init__(self, pool: UpstreamPool, settings: ProxySettings,
                 on_retry: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.in_flight = InFlight()
        self.on_retry = on_retry
        self._requests = itertools.count(1)

    async def forward(self, request: Request, response: Response, path: str, body: bytes,
                      candidates: tuple[Endpoint, ...], on_result: OnResult | None = None,
                      exchange: Exchange | None = None) -> None:
        """Answer ``request`` from one of ``candidates``; raises GatewayError when none can."""
        ex = exchange if exchange is not None else Exchange(time.monotonic())
        if not candidates:
            raise NoCapacity("no ready instance of this model right now; retry shortly")
        headers = upstream_headers(request)
        seq = next(self._requests)
        fault = _NO_FAULT
        tried: set[str] = set()
        last_error: GatewayError | None = None
        last_reason = ""
        attempts = min(self.settings.max_attempts, len(candidates))
        for attempt in range(attempts):
            ep = pick_affinity(candidates, self.in_flight.counts, ex.session, exclude=tried)
            if ep is None:
                break
            tried.add(ep.instance_id)
            if attempt and self.on_retry:
                self.on_retry()
            self.in_flight.acquire(ep)
            try:
                upstream = await self.pool.request(ep.url, path, headers, body, self.settings.first_byte_timeout_s)
            except UpstreamError as exc:
                self.in_flight.release(ep)
                last_reason = reason = "timed out" if isinstance(exc, UpstreamTimeoutError) else str(exc)
                log.warning("upstream failed before first byte", instance=ep.instance_id, error=reason,
                            attempt=attempt + 1)
                last_error = (UpstreamTimeout if isinstance(exc, UpstreamTimeoutError) else UpstreamFailed)(
                    f"instance {ep.instance_id} of '{ep.model}' failed: {reason}")
                if fault is _NO_FAULT:
                    fault = Attribution()
                verdict = fault.answer_failed(ep.instance_id) if exc.sent else fault.connect_failed(ep.instance_id)
                _blame(on_result, candidates, verdict.blame, reason, seq)
                if not verdict.retry:
                    break   # the same body failed on two instances: it is the cause, not them
                continue
            except BaseException:
                self.in_flight.release(ep)
                raise
            if upstream.status >= 500:
                if fault is _NO_FAULT:
                    fault = Attribution()
                verdict = fault.answer_failed(ep.instance_id)
                if verdict.retry and attempt + 1 < attempts:
                    upstream.close()
                    self.in_flight.release(ep)
                    log.warning("upstream answered 5xx; retrying elsewhere", instance=ep.instance_id,
                                status=upstream.status)
                    continue
                # relayed as the engine wrote it: reproduced (nobody blamed), or nowhere else to try
                _blame(on_result, candidates, fault.gave_up() if verdict.retry else (), f"HTTP {upstream.status}",
                       seq)
            else:
                if fault.undecided is not None:
                    _blame(on_result, candidates, fault.answered(), last_reason or "HTTP 5xx", seq)
                if on_result:
                    on_result(ep, None, seq)
            ex.instance_id = ep.instance_id
            try:
                return await self._relay(response, upstream, ex)
            finally:
                self.in_flight.release(ep)
        _blame(on_result, candidates, fault.gave_up(), last_reason, seq)
        raise last_error or UpstreamFailed("no instance could be reached")

    async def _relay(self, response: Response, upstream: UpstreamResponse, ex: Exchange) -> None:
        """Copy status, headers and body to the client, chunk by chunk as they arrive."""
        completed = False
        stall = self.settings.stall_timeout_s
        try:
            headers, sse = response_headers(upstream.headers, ex.extra_headers)
            length = upstream.content_length
            tap = ex.tap = StreamTap(ex.started, strip_usage=ex.strip_usage, field=ex.token_field) if sse else None
            failed = upstream.status >= 400 and tap is None
            if failed or (length is not None and length <= WHOLE_BYTES):
                # small answers whole; an engine's error whole too (bounded), to answer it in the envelope
                try:
                    data, whole = await _read_bounded(upstream, stall, WHOLE_BYTES if length is None or failed
                                                      else length)
                except (UpstreamTimeoutError, UpstreamBroken) as exc:
                    raise UpstreamFailed(f"instance {ex.instance_id} broke off its answer: {exc}") from None
                completed = whole
                ex.completed = True
                if failed and (wrapped := as_envelope(upstream.status, data)) is not None:
                    headers = [h for h in headers if h[0].lower() != b"content-type"]
                    headers.append((b"Content-Type", b"application/json"))
                    data = wrapped
                if tap is not None:
                    data = tap.feed_all(data, time.monotonic())
                    ex.usage = tap.usage()
                    if ex.usage is None and upstream.status < 400:
                        ex.usage = fallback_usage(ex.request_bytes, tap.count_token_events(data))
                elif upstream.status < 400 and b'"usage"' in data:
                    ex.usage = usage_from_body(data)
                response.send(upstream.status, headers, data)
                return
            if length is not None and tap is not None and ex.strip_usage:
                length = None  # the tap may take the usage event out: the length is no longer known
            response.start(upstream.status, headers, length)
            tail = b""
            try:
                while True:
                    try:
                        chunk = await upstream.read_some(stall)
                    except UpstreamTimeoutError:
                        log.warning("upstream stalled; ending the stream", stall_s=stall)
                        break
                    except UpstreamBroken as exc:
                        log.warning("upstream broke mid-stream", error=str(exc))
                        break
                    if not chunk:
                        completed = True
                        break
                    if tap is not None:
                        chunk = tap.feed(chunk, time.monotonic())
                        if not chunk:
                            continue
                    elif upstream.status < 400:
                        tail = chunk[-TAIL_BYTES:] if len(chunk) >= TAIL_BYTES else (tail + chunk)[-TAIL_BYTES:]
                    await response.write(chunk)
                if tap is not None:
                    rest = tap.finish()
                    if rest:
                        await response.write(rest)
            finally:
                # also when the client went away mid-stream (CancelledError): what it received is counted
                if tap is not None:
                    ex.usage = tap.usage()
                    if ex.usage is None and upstream.status < 400:   # no usage event, or cut before it
                        ex.usage = fallback_usage(ex.request_bytes, tap.token_events)
                elif tail:
                    ex.usage = usage_from_tail(tail)
            ex.completed = completed
            if completed:
                response.end()
            else:
                response.abort()  # rather than pretending the stream ended cleanly
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()  # the engine sees the disconnect and stops generating


_NO_FAULT = Attribution()   # shared while nothing failed (its undecided stays None): one object less a request


def _blame(on_result: OnResult | None, candidates: tuple[Endpoint, ...], instance_ids: tuple[str, ...], reason: str,
           seq: int) -> None:
    """Report failures that count toward the ejection of ``instance_ids``."""
    if on_result and instance_ids:
        for ep in candidates:
            if ep.instance_id in instance_ids:
                on_result(ep, reason, seq)


async def _read_bounded(upstream: UpstreamResponse, stall: float, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` body bytes, and whether that was the whole body (else the rest is dropped)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await upstream.read_some(stall):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], False
    return b"".join(parts), True
