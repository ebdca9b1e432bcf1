"""One attacker process of the slowloris test: many connections that trickle a request head.

    python -m tests.security.slowloris_client --port P --sources 127.0.0.2,127.0.0.3 --count 2500 \\
        --interval 3 --linger 40 --ready FILE --out FILE

Opens ``count`` connections to 127.0.0.1:P from the given loopback source addresses (round
robin), sends a request line, then one header line every ``interval`` seconds and never the blank
line that ends the head. Writes ``ready`` once every connection is open (or failed), then runs
until all are closed by the server or ``linger`` seconds have passed, and writes, to ``out``, for
each connection that opened: when it opened and when the server closed it (CLOCK_MONOTONIC, the
same clock in every process). Loopback only; bounded by ``count`` and ``linger``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import time
from pathlib import Path


async def _one(port: int, source: str, interval: float, gate: asyncio.Semaphore,
               opened: list[float | None], closed: list[float | None], slot: int) -> None:
    try:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10)
    except (OSError, TimeoutError):
        opened[slot] = -1.0   # never connected
        return
    opened[slot] = time.monotonic()
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")
        line = 0
        while True:
            try:
                data = await asyncio.wait_for(reader.read(4096), interval)
            except TimeoutError:
                line += 1
                writer.write(b"X-Slow-%d: v\r\n" % line)   # never the blank line that ends the head
                continue
            if not data:   # (a 408 may arrive first: read on until the close)
                break
    except (ConnectionError, OSError):
        pass
    closed[slot] = time.monotonic()
    with contextlib.suppress(Exception):
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    sources = args.sources.split(",")
    opened: list[float | None] = [None] * args.count
    closed: list[float | None] = [None] * args.count
    gate = asyncio.Semaphore(256)   # connects in flight: a burst must not overflow the accept queue
    tasks = [asyncio.create_task(_one(args.port, sources[slot % len(sources)], args.interval, gate, opened,
                                      closed, slot)) for slot in range(args.count)]
    while any(o is None for o in opened):
        await asyncio.sleep(0.05)
    good = [o for o in opened if o is not None and o >= 0]
    Path(args.ready).write_text(json.dumps({"opened": len(good), "failed": args.count - len(good),
                                            "at": time.monotonic()}))
    deadline = time.monotonic() + args.linger
    while time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    Path(args.out).write_text(json.dumps([[o, c] for o, c in zip(opened, closed, strict=True)
                                          if o is not None and o >= 0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--count", type=int, default=2500)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--linger", type=float, default=40.0)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.run(_main(args))
    except ImportError:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
