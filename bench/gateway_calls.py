"""Python function calls per proxied request: a cost measure that other load on the machine cannot move.

CPU time per request (``bench/gateway_bench.py``) is the real cost, but on a shared 2-core machine
it moves by ±10 % from one run to the next. The number of Python-level calls a request makes is
deterministic; in a Python data path it tracks CPU closely. This runs, for each checkout given, a
gateway in-process (auth off, asyncio loop) in front of a canned upstream (the same 64-event SSE
body as gateway_bench, with a Content-Length), sends ``--requests`` keep-alive requests from a
client process, and counts calls with cProfile (builtins such as ``len`` counted apart, since
they cost a fraction of a Python call).

    python bench/gateway_calls.py --requests 2000 --baseline-root /tmp/base-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UPSTREAM = r'''
import asyncio, sys
BODY = open(sys.argv[2], "rb").read()
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(BODY)
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
            await reader.readexactly(n)
            writer.write(HEAD + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
        pass
async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
asyncio.run(main())
'''

CLIENT = r'''
import http.client, json, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Write one sentence about foxes."}],
                   "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}})
for _ in range(int(sys.argv[2])):
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
'''


def measure(root: Path, requests: int) -> dict[str, float]:
    """Run in a fresh interpreter whose imports come from ``root`` (see main)."""
    sys.path.insert(0, str(root))
    from controlplane.etcdproc import EtcdProcess
    from controlplane.keys import Keys
    from controlplane.logsetup import configure_logging
    from controlplane.netutil import free_port
    from controlplane.store import EtcdConfig, EtcdStore
    from gateway.app import GatewayConfig
    from tests.cluster import gateway_in_process, instance_record

    sys.path.insert(1, str(ROOT))
    from bench.canned_sse.sse import sse_body

    tmp = Path(tempfile.mkdtemp(prefix="mp-calls-"))
    body, _ = sse_body(64, "bench")
    (tmp / "body.sse").write_bytes(body)
    (tmp / "up.py").write_text(UPSTREAM)
    (tmp / "client.py").write_text(CLIENT)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(tmp / "up.py"), str(port), str(tmp / "body.sse")])
    etcd = EtcdProcess.in_temp_dir().start()
    configure_logging(level="warning", fmt="json")

    async def run() -> dict[str, float]:
        prefix = f"/calls-{uuid.uuid4().hex[:6]}"
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix)).connect()
        await store.put(Keys(prefix).instance("bench", "b-1"),
                        instance_record("bench", "b-1", f"http://127.0.0.1:{port}").SerializeToString())
        await store.close()
        config = GatewayConfig(etcd=EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix), auth=False)
        async with gateway_in_process(config) as (gw, url):
            while not gw.table.ready("bench"):
                await asyncio.sleep(0.05)
            gport = url.rsplit(":", 1)[1]
            warm = await asyncio.create_subprocess_exec(sys.executable, str(tmp / "client.py"), gport, "300")
            await warm.wait()
            profile = cProfile.Profile()
            began = time.process_time()
            profile.enable()
            client = await asyncio.create_subprocess_exec(sys.executable, str(tmp / "client.py"), gport,
                                                          str(requests))
            await client.wait()
            profile.disable()
            cpu = time.process_time() - began
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        python = sum(cc for (file, _, _), (cc, *_rest) in stats.items() if file != "~")
        builtin = sum(cc for (file, _, _), (cc, *_rest) in stats.items() if file == "~")
        return {"python_calls_per_request": python / requests, "builtin_calls_per_request": builtin / requests,
                "cpu_us_per_request_profiled": cpu * 1e6 / requests}

    try:
        return asyncio.run(run())
    finally:
        upstream.terminate()
        upstream.wait(10)
        etcd.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline-root", type=Path, help="another checkout to compare with")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)   # internal: one checkout, JSON out
    args = parser.parse_args(argv)
    if args.measure:
        print("CALLSJSON " + json.dumps(measure(args.measure, args.requests)))
        return 0
    roots = {"this": ROOT, **({"baseline": args.baseline_root.resolve()} if args.baseline_root else {})}
    results = {}
    for name, root in roots.items():
        done = subprocess.run([sys.executable, __file__, "--measure", str(root), "--requests", str(args.requests)],
                              capture_output=True, text=True, timeout=600, cwd=root)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("CALLSJSON ")), None)
        if line is None:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return 1
        results[name] = json.loads(line[len("CALLSJSON "):])
    print(f"\n{args.requests} requests (64-event SSE body, Content-Length), cProfile, asyncio loop\n")
    print("| checkout | Python calls / request | builtin calls / request |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['python_calls_per_request']:.1f} | {r['builtin_calls_per_request']:.1f} |")
    if "baseline" in results:
        t, b = results["this"], results["baseline"]
        py = t["python_calls_per_request"] / b["python_calls_per_request"]
        builtin = t["builtin_calls_per_request"] / b["builtin_calls_per_request"]
        print(f"\nratio this/baseline: Python calls {py:.3f}, builtin calls {builtin:.3f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
