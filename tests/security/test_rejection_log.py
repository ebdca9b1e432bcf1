"""Every rejection is a clear status in the OpenAI envelope, logged once at info with its request
id, never with a traceback.

Each bad request below goes on a fresh connection; its answer's X-Request-Id is then looked up
in the gateway's JSON log: exactly one info line carries it, with its status (a warning about a
failing engine may carry the id as well: that is a finding about the engine, not the rejection).
"""

from __future__ import annotations

import asyncio

from controlplane.netutil import free_port
from tests.security.edge import World, chat_body, parse_responses, raw, request_bytes

ALLOWED = {400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 502, 503}


async def test_every_rejection_is_an_envelope_logged_once_at_info(world: World) -> None:
    ann, bob, lim = world.keys["ann"], world.keys["bob"], world.keys["lim"]
    await world.register("dead", "dead-1", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    await world.routable("dead")
    post = "/v1/chat/completions"
    cases: dict[str, tuple[bytes, int, float]] = {
        "bad json": (request_bytes("POST", post, key=ann, body=b'{"model": '), 400, 2),
        "bad http": (b"GET / HTTP/1.1\r\nHost: g\r\nBad Header\r\n\r\n", 400, 2),
        "no host": (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, 2),
        "no key": (request_bytes("POST", post, body=chat_body("pub")), 401, 2),
        "bad key": (request_bytes("POST", post, key="mp-nope", body=chat_body("pub")), 401, 2),
        "not allowed": (request_bytes("POST", post, key=bob, body=chat_body("flaky")), 403, 2),
        "no model": (request_bytes("POST", post, key=ann, body=chat_body("nope")), 404, 2),
        "no route": (request_bytes("GET", "/nope", key=ann), 404, 2),
        "wrong method": (request_bytes("PUT", post, key=ann, body=b"{}"), 405, 2),
        "slow head": (b"GET /v1/models HTTP/1.1\r\nHost: g\r\n", 408, 8),
        "slow body": (request_bytes("POST", post, key=ann, headers=[("Content-Length", "100")]) + b"{", 408, 10),
        "too large": (request_bytes("POST", post, key=ann, headers=[("Content-Length", str(33 << 20))]), 413, 2),
        "long url": (request_bytes("GET", "/" + "u" * 20_000), 414, 2),
        "big headers": (request_bytes("GET", "/healthz", headers=[("X-Big", "h" * 70_000)]), 431, 2),
        "no capacity": (request_bytes("POST", post, key=ann, body=chat_body("empty")), 503, 2),
        "engine down": (request_bytes("POST", post, key=ann, body=chat_body("dead")), 502, 5),
    }
    # the rate limit: the first request passes, the second is a 429
    first = parse_responses(await raw(world.port, request_bytes("POST", post, key=lim, body=chat_body("pub")),
                                      until_closed=False))
    assert first and first[0].status == 200
    cases["rate limited"] = (request_bytes("POST", post, key=lim, body=chat_body("pub")), 429, 2)

    async def one(name: str, data: bytes, status: int, wait: float) -> tuple[str, str]:
        replies = parse_responses(await raw(world.port, data, read_for=wait, until_closed=False))
        assert len(replies) == 1, (name, replies)
        reply = replies[0]
        assert reply.status == status, (name, reply.status, reply.body[:200])
        reply.envelope()
        if status in (429, 503):
            assert reply.header("retry-after"), name
        rid = reply.header("x-request-id")
        assert rid, name
        return name, rid

    try:
        ids = await asyncio.gather(*(one(n, d, s, w) for n, (d, s, w) in cases.items()))
    finally:
        await world.unregister("dead")
    assert all(s in ALLOWED for _, s, _ in cases.values())
    await asyncio.sleep(0.6)   # the access log is written in batches (0.25 s)
    lines = world.log_lines()
    for name, rid in ids:
        # one info line: the rejection (warnings about a failing engine may carry the id too)
        mine = [line for line in lines if line.get("request_id") == rid and line.get("level") == "info"]
        assert len(mine) == 1, (name, mine)
        assert mine[0].get("status") == cases[name][1], (name, mine)
    text = world.log_text()
    assert "Traceback" not in text and '"level": "error"' not in text and '"level":"error"' not in text
