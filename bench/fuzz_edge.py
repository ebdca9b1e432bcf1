"""Fuzz the gateway's HTTP edge: thousands of generated bad requests against a real `ctl gateway`.

One run starts, on loopback: a real etcd, a sim engine (model ``fuzz``), and `ctl gateway` with
auth on and its default limits (head and body deadlines 5 s, so that a request the fuzzer leaves
unfinished is answered within ``--timeout``), then sends ``--requests`` generated requests (truncated and
wrong-typed JSON, deep nesting, huge numbers, invalid UTF-8, odd model names, empty and multi-MB
bodies, broken HTTP framing, missing/bad keys), ``--concurrency`` at a time, each on its own
connection, each bounded by ``--timeout``. It reports:

- counts by status;
- gateway-made 5xx (must be 0): a 5xx the gateway wrote itself, not an engine's answer relayed
  (the sim's envelope has an integer ``code``; the gateway's a string);
- hangs (must be 0): no complete answer within ``--timeout`` seconds;
- errors outside the OpenAI envelope (must be 0): a status >= 400 whose body is not exactly
  ``{"error": {"message", "type", "param", "code"}}``;
- tracebacks in the gateway's log (must be 0), and the gateway's RSS before and after.

    python bench/fuzz_edge.py --requests 10000 --concurrency 16 --seed 1 --json-out fuzz.json

Exit status 1 when any of the must-be-0 counts is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.etcdproc import EtcdProcess  # noqa: E402
from controlplane.keys import Keys  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.pb import ApiKey  # noqa: E402
from controlplane.procs import spawn, stop  # noqa: E402
from controlplane.store import EtcdConfig, EtcdStore  # noqa: E402
from gateway.auth import key_hash, new_api_key  # noqa: E402
from tests.cluster import Sim, instance_record, wait_http  # noqa: E402

MODEL = "fuzz"
ENVELOPE = {"message", "type", "param", "code"}
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/rerank",
          "/v1/score", "/v1/tokenize", "/tokenize", "/v1/detokenize"]
ODD_NAMES = ["", " ", "fuzz ", " fuzz", "FUZZ", "fuzz\x00", "../fuzz", "fuzz/../../etc", "%2e%2e", "é" * 50,
             "\u202e\u0066uzz", "x" * 10_000, "fuzz\r\nX-Injected: 1", "{{model}}", "$(id)", "null", "🦊", "\ud800"]


# -- generators -------------------------------------------------------------------------------------


def _chat(rng: random.Random, **over: object) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * rng.randint(1, 5)}],
                            "max_tokens": rng.randint(1, 3)}
    if rng.random() < 0.3:
        body["stream"] = True
    body.update(over)
    return body


def _deep(depth: int, rng: random.Random) -> str:
    opener, closer = ("[", "]") if rng.random() < 0.5 else ('{"a":', "}")
    return opener * depth + "1" + closer * depth


def gen_truncated(rng: random.Random) -> bytes:
    raw = orjson.dumps(_chat(rng))
    return raw[:rng.randint(0, len(raw) - 1)]


def gen_wrong_types(rng: random.Random) -> bytes:
    field = rng.choice(["model", "messages", "max_tokens", "stream", "n", "temperature", "stream_options",
                        "stop", "seed", "logprobs", "tools", "prompt", "input"])
    value: object = rng.choice([None, 0, -1, 2**62, "x", "", [], {}, [1, 2], {"a": 1}, True, 1.5, "9" * 30,
                        [{"role": 1}], [{"content": None}], [[]]])
    return orjson.dumps(_chat(rng, **{field: value}))


def gen_deep(rng: random.Random) -> bytes:
    depth = rng.choice([64, 512, 1000, 1023, 1024, 1025, 4096, 20_000])
    where = rng.choice(["x", "messages", "model"])
    nested = _deep(depth, rng)
    if where == "messages":
        return b'{"model":"fuzz","messages":' + nested.encode() + b"}"
    if where == "model":
        return b'{"model":' + nested.encode() + b',"messages":[]}'
    return b'{"model":"fuzz","messages":[{"role":"user","content":"x"}],"x":' + nested.encode() + b"}"


def gen_huge_numbers(rng: random.Random) -> bytes:
    number = rng.choice(["1e400", "-1e400", "9" * 400, "-" + "9" * 5000, "1." + "0" * 10_000 + "1", "NaN",
                         "Infinity", "-0", "0x10", "1e-400", "00012", "+5"])
    field = rng.choice(["max_tokens", "temperature", "n", "seed", "top_p"])
    return (f'{{"model":"fuzz","messages":[{{"role":"user","content":"x"}}],"{field}":{number}}}').encode()


def gen_bad_utf8(rng: random.Random) -> bytes:
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80" * 7])
    where = rng.choice(["content", "model", "key", "raw"])
    if where == "raw":
        return junk * rng.randint(1, 100)
    if where == "model":
        return b'{"model":"fu' + junk + b'zz","messages":[]}'
    if where == "key":
        return b'{"model":"fuzz","messages":[{"role":"user","content":"x"}],"' + junk + b'":1}'
    return b'{"model":"fuzz","messages":[{"role":"user","content":"a' + junk + b'b"}]}'


def gen_odd_model(rng: random.Random) -> bytes:
    name = rng.choice(ODD_NAMES)
    try:
        return orjson.dumps(_chat(rng, model=name))
    except orjson.JSONEncodeError:   # a lone surrogate: write the escape by hand
        return b'{"model":"\\ud800","messages":[]}'


def gen_empty(rng: random.Random) -> bytes:
    return rng.choice([b"", b" ", b"\n", b"{}", b"[]", b"null", b"0", b'""', b"{", b"}"])


def gen_big(rng: random.Random) -> bytes:
    size = rng.choice([1, 2, 4]) << 20
    kind = rng.choice(["junk", "json", "string"])
    if kind == "junk":
        return rng.randbytes(size)
    if kind == "string":
        return b'{"model":"fuzz","messages":[{"role":"user","content":"' + b"a" * size + b'"}]}'
    return b'{"model":"fuzz","messages":[' + b'{"role":"user","content":"x"},' * (size // 32) + b"{}]}"


BODIES: dict[str, tuple[float, Callable[[random.Random], bytes]]] = {
    "truncated json": (0.16, gen_truncated),
    "wrong-typed json": (0.16, gen_wrong_types),
    "deep nesting": (0.08, gen_deep),
    "huge numbers": (0.10, gen_huge_numbers),
    "invalid utf-8": (0.12, gen_bad_utf8),
    "odd model names": (0.12, gen_odd_model),
    "empty bodies": (0.08, gen_empty),
    "multi-MB bodies": (0.003, gen_big),
}


def frame(rng: random.Random, body: bytes, key: str) -> tuple[str, bytes]:
    """A request carrying ``body``: mostly well framed, sometimes broken at the HTTP level."""
    path = rng.choice(ROUTES) if rng.random() < 0.9 else rng.choice(["/v1/models", "/x", "/v1/chat/completions/",
                                                                      "/" + "a" * 20_000, "/v1/models/%ff"])
    auth = rng.choices([f"Bearer {key}", "", "Bearer mp-wrong", "Basic Zm9vOmJhcg==", "Bearer " + "k" * 5000,
                        "Bearer \xff"], weights=[70, 10, 8, 4, 4, 4])[0]
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", "Content-Type: application/json"]
    if auth:
        lines.append(f"Authorization: {auth}")
    kind = rng.random()
    if kind < 0.80:
        lines.append(f"Content-Length: {len(body)}")
        return "framed", ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    if kind < 0.88:
        lines.append("Transfer-Encoding: chunked")
        cut = rng.randint(0, len(body))
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
        return "chunked", ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + chunks + b"0\r\n\r\n"
    cl = f"Content-Length: {len(body)}"
    first, rest = lines[0], lines[1:]
    broken = rng.choice([
        [first, *rest, cl, f"Content-Length: {len(body) + 1}"],
        [first, *rest, cl, "Transfer-Encoding: chunked"],
        [first, *rest, "Content-Length: -1"],
        [first, *rest, "Content-Length: 99999999999999999999"],
        [first, *rest, f"Content-Length: {len(body) + 10}"],                    # more than is sent
        [first.replace("POST", rng.choice(["GET", "PUT", "P0ST", "CONNECT", "TRACE", ""])), *rest, cl],
        [first.replace("HTTP/1.1", rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/9", "HTTP/1.1x"])), *rest, cl],
        [first, *(line for line in rest if not line.startswith("Host")), cl],
        [first, *rest, "Host: second", cl],
        [first, *rest, " folded", cl],
        [first, *rest, "X-Request-Id: " + "r" * rng.choice([129, 60_000]), cl],
        [first, *rest, "Upgrade: h2c", "Connection: Upgrade", cl],
        [first, *rest, "Expect: 100-continue", cl],
    ])
    head = "\r\n".join(broken) + "\r\n\r\n"
    return "broken http", head.encode("latin-1", "replace") + body


# -- one request ------------------------------------------------------------------------------------


class _Reply:
    def __init__(self) -> None:
        self.status = 0
        self.body: list[bytes] = []
        self.done = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status >= 200:      # 100 Continue is interim
            self.done = True


async def send(port: int, data: bytes, timeout: float) -> tuple[int | str, bytes]:
    """The status and body of the first final answer; 'hang' or 'closed' when none came."""
    reply = _Reply()
    reply.parser = httptools.HttpResponseParser(reply)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return "connect failed", b""
    try:
        async def exchange() -> None:
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            while not reply.done:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                reply.parser.feed_data(chunk)  # type: ignore[union-attr]

        try:
            await asyncio.wait_for(exchange(), timeout)
        except TimeoutError:
            return "hang", b""
        except (ConnectionError, httptools.HttpParserError):
            pass
        return (reply.status if reply.done else "closed"), b"".join(reply.body)
    finally:
        writer.close()


def is_envelope(body: bytes) -> tuple[bool, object]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, None
    ok = isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], dict) \
        and set(payload["error"]) == ENVELOPE
    return ok, payload["error"].get("code") if ok else None


# -- the run ----------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def seed_etcd(endpoint: str, prefix: str, sim_url: str) -> str:
    store = await EtcdStore(EtcdConfig(endpoints=(endpoint,), prefix=prefix)).connect()
    keys = Keys(prefix)
    key = new_api_key()
    try:
        await store.put(keys.api_key(key_hash(key)), ApiKey(key_id="fuzz1", owner="fuzzer").SerializeToString())
        await store.put(keys.instance(MODEL, "fuzz-1"), instance_record(MODEL, "fuzz-1", sim_url).SerializeToString())
    finally:
        await store.close()
    return key


async def fuzz(port: int, key: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    names = list(BODIES)
    weights = [BODIES[n][0] for n in names]
    by_status: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    gateway_5xx: list[str] = []
    non_envelope: list[str] = []
    hangs: list[str] = []
    plan = []
    for _ in range(args.requests):
        kind = rng.choices(names, weights)[0]
        framing, data = frame(rng, BODIES[kind][1](rng), key)
        plan.append((kind, framing, data))
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            kind, framing, data = queue.get_nowait()
            status, body = await send(port, data, args.timeout)
            label = str(status)
            by_status[label] += 1
            by_kind[kind][label] += 1
            sample = f"{kind}/{framing}: {data[:160]!r}"
            if status == "hang":
                hangs.append(sample)
            if isinstance(status, int) and status >= 400:
                ok, code = is_envelope(body)
                if not ok:
                    non_envelope.append(f"{status} {sample} -> {body[:160]!r}")
                elif status >= 500 and not isinstance(code, int):   # the sim's codes are ints: relayed
                    gateway_5xx.append(f"{status} {sample} -> {body[:200]!r}")

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {"by_status": dict(sorted(by_status.items())), "by_kind": {k: dict(sorted(v.items()))
                                                                     for k, v in sorted(by_kind.items())},
            "gateway_5xx": gateway_5xx[:20], "gateway_5xx_count": len(gateway_5xx),
            "non_envelope": non_envelope[:20], "non_envelope_count": len(non_envelope),
            "hangs": hangs[:20], "hang_count": len(hangs), "seconds": round(time.monotonic() - began, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds before a request counts as a hang (the gateway's deadlines here are 5 s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="send the requests this many times to the same gateway, RSS after each round "
                             "(memory that grows round after round would be a leak)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mp-fuzz-"))
    etcd = EtcdProcess.in_temp_dir().start()
    sim: Sim | None = None
    gw = None
    try:
        sim = Sim(MODEL, tmp, "--ttft-ms", "1", "--tokens-per-s", "0")
        prefix = f"/fuzz-{uuid.uuid4().hex[:6]}"
        key = asyncio.run(seed_etcd(etcd.endpoint, prefix, sim.url))
        port = free_port()
        log = tmp / "gateway.log"
        gw = spawn([sys.executable, "-m", "controlplane.cli.main", "gateway", "--etcd", etcd.endpoint,
                    "--etcd-prefix", prefix, "--host", "127.0.0.1", "--port", str(port),
                    # default limits, but deadlines short enough that a request the fuzzer leaves
                    # unfinished is answered (408) well within --timeout
                    "--head-timeout", "5", "--body-timeout", "5"], log,
                   env={**os.environ, "MODELPOOL_LOG_FORMAT": "json"})
        wait_http(f"http://127.0.0.1:{port}/readyz", gw, log=log)
        time.sleep(0.5)   # the keys watch
        rss_before = rss_mib(gw.pid)
        rss_rounds = []
        for _ in range(args.rounds):
            result = asyncio.run(fuzz(port, key, args))
            time.sleep(1.0)
            rss_rounds.append(round(rss_mib(gw.pid), 1))
        rss_after = rss_rounds[-1]
        alive = gw.poll() is None
        text = log.read_text(errors="replace")
        result.update({"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                       "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
                       "rss_after_each_round_mib": rss_rounds, "rounds": args.rounds,
                       "gateway_alive": alive, "tracebacks": text.count("Traceback"),
                       "error_lines": sum(1 for line in text.splitlines() if '"level": "error"' in line
                                          or '"level":"error"' in line)})
    finally:
        if gw is not None:
            stop(gw, timeout=10)
        if sim is not None:
            sim.stop()
        etcd.stop()
    print_table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    bad = result["gateway_5xx_count"] or result["hang_count"] or result["non_envelope_count"] \
        or result["tracebacks"] or not result["gateway_alive"]
    return 1 if bad else 0


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['requests']} generated bad requests, {r['concurrency']} at a time, seed {r['seed']}, "
          f"{r['seconds']} s (the last of {r['rounds']} rounds)")
    print("\n| status | count |\n|---|---|")
    for status, count in r["by_status"].items():
        print(f"| {status} | {count} |")
    print("\n| kind | answers |\n|---|---|")
    for kind, counts in r["by_kind"].items():
        print(f"| {kind} | " + ", ".join(f"{s}: {c}" for s, c in counts.items()) + " |")
    print(f"\n| check | value |\n|---|---|\n| gateway-made 5xx | {r['gateway_5xx_count']} |"
          f"\n| hangs | {r['hang_count']} |\n| errors outside the OpenAI envelope | {r['non_envelope_count']} |"
          f"\n| tracebacks in the gateway log | {r['tracebacks']} |"
          f"\n| gateway RSS before / after | {r['rss_before_mib']} / {r['rss_after_mib']} MiB |"
          f"\n| RSS after each of {r['rounds']} rounds | {r['rss_after_each_round_mib']} MiB |"
          f"\n| gateway alive after | {r['gateway_alive']} |")
    for name in ("gateway_5xx", "non_envelope", "hangs"):
        for sample in r[name]:
            print(f"  {name}: {sample}")


if __name__ == "__main__":
    sys.exit(main())
