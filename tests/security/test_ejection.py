"""Attack 7 (steerable ejection): a body that makes engines fail must not eject healthy instances.

Before: a body that made engines answer 500 (1,000-deep JSON nesting: the sim's json parser
overflows, orjson in the gateway does not) got every healthy instance ejected at once and cost
the engines three attempts. Now a 5xx is retried once; when the second instance fails the same
body too, the body is the cause: nothing is ejected and nothing is retried further. Ejection
still happens for an instance that fails requests the others answer.
"""

from __future__ import annotations

import http.client

import orjson

from tests.security.edge import World, metric

POISON_DEPTH = 1000


def poison(i: int) -> bytes:
    nested = "[" * POISON_DEPTH + "]" * POISON_DEPTH
    return (f'{{"model":"pub","messages":[{{"role":"user","content":"poison {i}"}}],"x":{nested}}}').encode()


def post(world: World, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {world.keys['ann']}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def successes(world: World, model: str) -> list[float]:
    out = []
    for sim in world.sims[model]:
        text = scrape(sim.port)
        out.append(sum(metric(text, "vllm:request_success_total", model_name=model, finished_reason=r)
                       for r in ("length", "stop")))
    return out


def test_a_poison_body_ejects_nothing_and_costs_two_attempts(world: World) -> None:
    before = scrape(world.port)
    statuses = [post(world, poison(i)) for i in range(5)]
    after = scrape(world.port)
    assert statuses == [500] * 5        # the engines' own answer to that body, relayed
    retries = metric(after, "modelpool_gateway_retries_total") - metric(before, "modelpool_gateway_retries_total")
    assert retries == 5                 # one retry each: reproduced on a second instance, then no further
    assert metric(after, "modelpool_gateway_ejections_total", model="pub") == \
        metric(before, "modelpool_gateway_ejections_total", model="pub") == 0
    assert metric(after, "modelpool_gateway_ejected_instances") == 0
    # every instance still takes traffic
    served = successes(world, "pub")
    body = orjson.dumps({"model": "pub", "messages": [{"role": "user", "content": "fine"}], "max_tokens": 2})
    assert all(post(world, body) == 200 for _ in range(30))
    assert all(b > a for a, b in zip(served, successes(world, "pub"), strict=True))


def test_an_instance_failing_different_requests_is_ejected(world: World) -> None:
    """'flaky': one of three instances answers 500 to everything; the others answer."""
    body = orjson.dumps({"model": "flaky", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert all(post(world, body) == 200 for _ in range(20))
    assert metric(scrape(world.port), "modelpool_gateway_ejections_total", model="flaky") >= 1
