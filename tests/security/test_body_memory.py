"""Attack 1 (keyless memory) and the global body budget.

Before: bodies up to --max-body-mb were read into memory before the key was checked, and nothing
bounded the total: 20 connections sending 31 MiB each without a key grew the gateway by ~600 MiB.
Now the key is checked at headers-complete (a 401 leaves at once, the body is read and discarded,
never buffered) and the request-body bytes held at once are bounded (--body-budget-mb, 64 MiB in
this suite's gateway): past it, 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.security.edge import World, parse_responses, rss_kib

MIB = 1 << 20
BODY = 31 * MIB
PIECE = b"x" * MIB


def head(world: World, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def send_body(writer: asyncio.StreamWriter, size: int, pause: float = 0.0) -> None:
    sent = 0
    while sent < size:
        n = min(MIB, size - sent)
        writer.write(PIECE[:n])
        await writer.drain()
        sent += n
        if pause:
            await asyncio.sleep(pause)


async def read_all(reader: asyncio.StreamReader, within: float) -> bytes:
    out = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                out += chunk
    return bytes(out)


class PeakRss:
    """The gateway's RSS, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        self.peak = self.before
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, rss_kib(self.pid))
                await asyncio.sleep(0.02)

        self._task = asyncio.create_task(sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def grew_mib(self) -> float:
        return (self.peak - self.before) / 1024


async def test_keyless_request_is_answered_401_before_its_body_and_the_sender_reads_it(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    try:
        writer.write(head(world, BODY))
        await writer.drain()
        # the head alone earns the answer: nothing waits for 31 MiB that will be thrown away
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert first.startswith(b"HTTP/1.1 401 "), first
        assert b"Connection: close" in first
        # a client that keeps sending (as most do) finishes without a reset, then sees the close
        began = time.monotonic()
        await send_body(writer, BODY)
        rest = await read_all(reader, 5.0)
        assert time.monotonic() - began < 5.0
        (reply,) = parse_responses(first + rest)
        assert reply.status == 401 and reply.envelope()["code"] == "invalid_api_key"
        assert reader.at_eof()
    finally:
        writer.close()


async def test_20_keyless_31mib_bodies_add_at_most_64mib(world: World) -> None:
    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        try:
            writer.write(head(world, BODY))
            await send_body(writer, BODY)
            replies = parse_responses(await read_all(reader, 10.0))
            return replies[0].status if replies else 0
        finally:
            writer.close()

    async with PeakRss(world.gateway.pid) as rss:
        statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 60)
    print(f"\n20 keyless 31 MiB bodies: gateway RSS {rss.before / 1024:.1f} MiB before, peak "
          f"{rss.peak / 1024:.1f} MiB (+{rss.grew_mib:.1f} MiB)")
    assert statuses == [401] * 20
    assert rss.grew_mib <= 64, f"the gateway grew by {rss.grew_mib:.0f} MiB"


async def test_keyed_bodies_beyond_the_budget_get_503_with_retry_after(world: World) -> None:
    """Four keyed 31 MiB bodies at once against a 64 MiB budget: not all of them can be held."""
    key = world.keys["ann"]

    async def one() -> tuple[int, str | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        try:
            writer.write(head(world, BODY, key))
            with contextlib.suppress(ConnectionError):
                await send_body(writer, BODY, pause=0.01)   # slowly: all four are in flight together
            replies = parse_responses(await read_all(reader, 10.0))
            return (replies[0].status, replies[0].header("retry-after")) if replies else (0, None)
        finally:
            writer.close()

    async with PeakRss(world.gateway.pid) as rss:
        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(4))), 60)
    print(f"\n4 keyed 31 MiB bodies, 64 MiB budget: {results}; RSS +{rss.grew_mib:.1f} MiB")
    busy = [r for r in results if r[0] == 503]
    assert busy and all(retry == "1" for _, retry in busy), results
    assert all(status in (400, 503) for status, _ in results), results   # 400: the held ones are not JSON
    assert rss.grew_mib <= 3 * 64, f"the gateway grew by {rss.grew_mib:.0f} MiB"
