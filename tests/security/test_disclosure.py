"""Attacks 4 and 5: private model names must not leak through /metrics or error answers.

Before: keyless /metrics carried a private model's name once an allowed user had called it, and a
key limited to some models got 404 for a private model but 403 for a name that does not exist, so
private names could be enumerated. Now every private model is summed under model="_private" in
/metrics, and "not visible to this key" and "does not exist" get the same status and body (a
visible model outside the key's allowed_models keeps its 403).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import orjson

from tests.security.edge import World, chat_body, parse_responses, raw, request_bytes


async def ask(world: World, method: str, path: str, key: str | None, body: bytes | None = None) -> tuple[int, bytes]:
    data = await raw(world.port, request_bytes(method, path, key=key, body=body), until_closed=False)
    (reply,) = parse_responses(data)
    return reply.status, reply.body


async def test_metrics_never_name_a_private_model(world: World) -> None:
    for model in ("secret", "pub"):
        status, _ = await ask(world, "POST", "/v1/chat/completions", world.keys["ann"], chat_body(model))
        assert status == 200
    status, text = await ask(world, "GET", "/metrics", None)
    assert status == 200
    assert b"secret" not in text
    assert b'model="_private"' in text and b'model="pub"' in text


def _same_answer(a: bytes, b: bytes, name_a: str, name_b: str) -> bool:
    return orjson.loads(a) == orjson.loads(b.replace(name_b.encode(), name_a.encode()))


async def test_hidden_and_missing_models_get_the_same_answer(world: World) -> None:
    bob = world.keys["bob"]            # allowed_models ["pub"]; not an owner of "secret"
    missing = "secreu"                 # same length as "secret": any size difference would show
    for method, path_of, body_of in (("POST", lambda m: "/v1/chat/completions", chat_body),
                                     ("GET", lambda m: f"/v1/models/{m}", lambda m: None)):
        hidden = await ask(world, method, path_of("secret"), bob, body_of("secret"))
        absent = await ask(world, method, path_of(missing), bob, body_of(missing))
        assert hidden[0] == absent[0] == 404, (hidden, absent)
        assert _same_answer(hidden[1], absent[1], "secret", missing)
    # a model bob may see but not use is still a 403: nothing private about it
    status, body = await ask(world, "POST", "/v1/chat/completions", bob, chat_body("flaky"))
    assert status == 403 and orjson.loads(body)["error"]["code"] == "model_not_allowed"


async def test_no_timing_difference_between_hidden_and_missing(world: World) -> None:
    bob = world.keys["bob"]
    times: dict[str, list[float]] = {"secret": [], "secreu": []}
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    try:
        for i in range(300):
            model = "secret" if i % 2 else "secreu"
            began = time.perf_counter()
            writer.write(request_bytes("POST", "/v1/chat/completions", key=bob, body=chat_body(model)))
            data = b""
            while not parse_responses(data):
                data += await asyncio.wait_for(reader.read(65536), 5)
            times[model].append(time.perf_counter() - began)
    finally:
        writer.close()
    hidden, absent = statistics.median(times["secret"]), statistics.median(times["secreu"])
    print(f"\nmedian answer: hidden {hidden * 1e3:.3f} ms, missing {absent * 1e3:.3f} ms")
    assert abs(hidden - absent) <= max(0.2e-3, 0.25 * absent), (hidden, absent)
