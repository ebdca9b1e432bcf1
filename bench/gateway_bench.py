"""Streamed chat-completion throughput and latency: our gateway against nginx, vllm-router and a naive proxy.

One run starts, on loopback: nginx serving a canned SSE stream (bench/canned_sse/) as the
"engine"; a real etcd with ONE READY InstanceRecord pointing at nginx; one `ctl gateway --no-auth
--workers N` per value of --workers; vllm-router (if installed) and a 20-line aiohttp proxy, both
in front of the same nginx. wrk (with a Lua script for the POST body and a JSON summary) then
drives each target at each concurrency for --duration seconds, --repeats times, interleaved, and
the median of each metric is reported with ratios taken in the same run. Besides req/s and
p50/p99 of the whole-stream latency, it reports the CPU time the target's processes used per
request (all processes share the machine's cores, so CPU per request is the fairest cost).

    python bench/gateway_bench.py --workers 1 2 --concurrency 1 32 --duration 5 --repeats 3 \\
        --json-out bench-gateway.json

Needs nginx and wrk on PATH (apt-get install -y nginx wrk); vllm-router is skipped if missing.

``--baseline-root DIR`` also runs the gateway from another checkout (e.g. ``git archive`` of the
commit to compare with) as ``base-wN``, against the same etcd and nginx, so that a change's CPU per
request is compared in one run. The targets ``ours-bare``, ``granian-rsgi`` and
``uvicorn-httptools`` are the thinnest proxies on those servers (``bench/server_candidates.py``),
for deciding the edge's server.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.canned_sse.sse import sse_body  # noqa: E402
from controlplane.etcdproc import EtcdProcess  # noqa: E402
from controlplane.keys import Keys  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.procs import spawn, stop  # noqa: E402
from controlplane.store import EtcdConfig, EtcdStore  # noqa: E402
from tests.cluster import instance_record, start_gateway, wait_http  # noqa: E402

MODEL = "bench"
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "Write one sentence about foxes."}],
           "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}

WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[@BODY@]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class Target:
    """One thing wrk drives: its URL and the process (tree) whose CPU time is counted."""

    name: str
    url: str
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)


# -- naive baseline ---------------------------------------------------------------------------

def naive_proxy(port: int, upstream: str) -> None:
    """What 'just proxy it with aiohttp' gives: read, POST upstream, copy chunks back."""
    import aiohttp
    import uvloop
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["session"].post(upstream + request.path, data=body,
                                               headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["session"].close()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=uvloop.new_event_loop())


# -- processes --------------------------------------------------------------------------------

def start_nginx(tmp: Path, body: bytes, event_bytes: int, mode: str = "chunked") -> tuple[subprocess.Popen[bytes], str]:
    ngx = tmp / "nginx"
    ngx.mkdir()
    (ngx / "body.sse").write_bytes(body)
    port = free_port()
    conf = (ROOT / "bench" / "canned_sse" / "nginx.conf.template").read_text()
    conf = conf.replace("@DIR@", str(ngx)).replace("@PORT@", str(port)).replace("@MODEL@", MODEL)
    conf = conf.replace("@EVENT_BYTES@", str(event_bytes))
    conf = conf.replace("@CANNED@", "/canned/" if mode == "chunked" else "/static/")
    (ngx / "nginx.conf").write_text(conf)
    proc = spawn(["nginx", "-p", str(ngx), "-c", str(ngx / "nginx.conf"), "-e", str(ngx / "error.log")],
                 tmp / "nginx.out")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, log=ngx / "error.log")
    return proc, url


def start_vllm_router(tmp: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str] | None:
    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(exe).exists():
        print("vllm-router not installed (pip install vllm-router): skipped", file=sys.stderr)
        return None
    port = free_port()
    argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream, "--policy", "round_robin",
            "--log-level", "warning", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    log = tmp / "vllm-router.log"
    proc = spawn(argv, log)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, log=log, timeout=60)
    return proc, url


def start_candidate(tmp: Path, upstream: str, which: str) -> tuple[subprocess.Popen[bytes], str] | None:
    """A bare proxy on our server, granian (RSGI) or uvicorn (httptools): bench/server_candidates.py."""
    port = free_port()
    bindir = Path(sys.executable).parent
    if which == "ours-bare":
        exe = Path(sys.executable)
        argv = [sys.executable, "-m", "bench.server_candidates", str(port)]
    elif which == "granian-rsgi":
        exe = bindir / "granian"
        argv = [str(exe), "--interface", "rsgi", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--loop", "uvloop", "--no-ws", "--log-level", "warning", "bench.server_candidates:rsgi_app"]
    else:
        exe = bindir / "uvicorn"
        argv = [str(exe), "bench.server_candidates:asgi_app", "--host", "127.0.0.1", "--port", str(port),
                "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    if not exe.exists():
        print(f"{which}: {exe.name} not installed (pip install granian uvicorn): skipped", file=sys.stderr)
        return None
    log = tmp / f"{which}.log"
    env = {**os.environ, "MODELPOOL_BENCH_UPSTREAM": upstream, "PYTHONPATH": str(ROOT)}
    proc = spawn(argv, log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, log=log)
    return proc, url


def start_gateway_from(root: Path, endpoint: str, prefix: str, tmp: Path, workers: int
                       ) -> tuple[subprocess.Popen[bytes], str]:
    """`ctl gateway` run from another checkout (its own code, this venv's packages)."""
    port = free_port()
    log = tmp / f"base-gateway-{port}.log"
    argv = [sys.executable, "-m", "controlplane.cli.main", "gateway", "--etcd", endpoint, "--etcd-prefix", prefix,
            "--host", "127.0.0.1", "--port", str(port), "--no-auth", "--workers", str(workers)]
    proc = spawn(argv, log, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, log=log)
    return proc, f"http://127.0.0.1:{port}"


def start_naive(tmp: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = tmp / "naive.log"
    proc = spawn([sys.executable, __file__, "naive-proxy", str(port), upstream], log)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, log=log)
    return proc, url


async def register_instance(endpoint: str, prefix: str, upstream: str) -> None:
    store = await EtcdStore(EtcdConfig(endpoints=(endpoint,), prefix=prefix)).connect()
    try:
        rec = instance_record(MODEL, "nginx-1", upstream)
        await store.put(Keys(prefix).instance(MODEL, "nginx-1"), rec.SerializeToString())
    finally:
        await store.close()


def wait_routable(url: str, timeout: float = 30.0) -> None:
    """Every worker answers: 30 fresh connections in a row find the model."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 30:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} does not route '{MODEL}'")
        try:
            with urllib.request.urlopen(f"{url}/v1/models/{MODEL}", timeout=2) as r:
                streak = streak + 1 if r.status == 200 else 0
        except OSError:
            streak = 0
            time.sleep(0.05)


def fetch_stream(url: str) -> bytes:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(REQUEST).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return bytes(r.read())


# -- measuring --------------------------------------------------------------------------------

def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and all its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    wanted, total, frontier = {pid}, 0.0, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in wanted:
                wanted.add(child)
                frontier.append(child)
    for p in wanted:
        total += stats.get(p, (0, 0.0))[1]
    return total


def run_wrk(lua: Path, url: str, concurrency: int, duration: int) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, duration)}s", "--timeout", "10s", "-s", str(lua),
            url + "/v1/chat/completions"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(line[len("WRKJSON "):])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {"rps": raw["requests"] / (raw["duration_us"] / 1e6), "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "mean_ms": raw["mean_us"] / 1000,
            "requests": raw["requests"], "errors": errors}


def measure(target: Target, lua: Path, concurrency: int, duration: int) -> dict[str, float]:
    cpu0 = tree_cpu_s(target.pid)
    result = run_wrk(lua, target.url, concurrency, duration)
    result["cpu_ms_per_req"] = (tree_cpu_s(target.pid) - cpu0) * 1000 / max(1, result["requests"])
    return result


def _groups(targets: list[Target], by_name: dict[str, Target], paired: bool) -> list[list[Target]]:
    """Targets measured one after the other; with ``paired``, each gateway-wN together with base-wN."""
    out: list[list[Target]] = []
    for t in targets:
        if paired and t.name.startswith("base-"):
            continue
        twin = by_name.get(t.name.replace("gateway-", "base-")) if paired and t.name.startswith("gateway-") else None
        out.append([t, twin] if twin is not None else [t])
    return out


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


# -- the run ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="gateway --workers values to measure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent streams")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per point (median reported)")
    parser.add_argument("--chunks", type=int, default=64, help="SSE events per response (plus [DONE])")
    parser.add_argument("--targets", nargs="+", default=["direct", "gateway", "vllm-router", "naive"],
                        choices=["direct", "gateway", "vllm-router", "naive", "granian-rsgi", "uvicorn-httptools",
                                 "ours-bare"])
    parser.add_argument("--baseline-root", type=Path, help="also run the gateway from this checkout (base-wN)")
    parser.add_argument("--paired", action="store_true",
                        help="with --baseline-root: drive gateway-wN and base-wN at the same time (two wrk), so "
                             "that both see the same load from the rest of the machine")
    parser.add_argument("--upstream", choices=["chunked", "static"], default="chunked",
                        help="chunked: one HTTP chunk per SSE event, as engines stream (default); static: the "
                             "same body in one write with Content-Length, so only the proxies' cost shows")
    parser.add_argument("--json-out", type=Path, help="write results here as JSON")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="after setup, print the targets and keep them up this many seconds (for profiling)")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} is not installed (apt-get install -y nginx wrk); nothing measured", file=sys.stderr)
            return 0

    tmp = Path(tempfile.mkdtemp(prefix="mp-gwbench-"))
    body, event_bytes = sse_body(args.chunks, MODEL)
    lua = tmp / "post.lua"
    lua.write_text(WRK_LUA.replace("@BODY@", json.dumps(REQUEST)))
    procs: list[subprocess.Popen[bytes]] = []
    etcd: EtcdProcess | None = None
    targets: list[Target] = []
    try:
        nginx, upstream = start_nginx(tmp, body, event_bytes, args.upstream)
        procs.append(nginx)
        targets.append(Target("direct", upstream, nginx.pid, nginx))
        if "gateway" in args.targets:
            etcd = EtcdProcess.in_temp_dir().start()
            prefix = f"/gwbench-{uuid.uuid4().hex[:6]}"
            asyncio.run(register_instance(etcd.endpoint, prefix, upstream))
            for n in args.workers:
                gw, url = start_gateway(etcd.endpoint, prefix, tmp, "--no-auth", "--workers", str(n))
                procs.append(gw)
                wait_routable(url)
                targets.append(Target(f"gateway-w{n}", url, gw.pid, gw))
                if args.baseline_root:
                    base, base_url = start_gateway_from(args.baseline_root, etcd.endpoint, prefix, tmp, n)
                    procs.append(base)
                    wait_routable(base_url)
                    targets.append(Target(f"base-w{n}", base_url, base.pid, base))
        if "vllm-router" in args.targets:
            started = start_vllm_router(tmp, upstream)
            if started:
                procs.append(started[0])
                targets.append(Target("vllm-router", started[1], started[0].pid, started[0]))
        for which in ("ours-bare", "granian-rsgi", "uvicorn-httptools"):
            if which in args.targets and (cand := start_candidate(tmp, upstream, which)):
                procs.append(cand[0])
                targets.append(Target(which, cand[1], cand[0].pid, cand[0]))
        if "naive" in args.targets:
            naive, url = start_naive(tmp, upstream)
            procs.append(naive)
            targets.append(Target("naive-aiohttp", url, naive.pid, naive))
        if "direct" not in args.targets:
            targets = targets[1:]
        identical = {t.name: fetch_stream(t.url) == body for t in targets}
        if args.hold:
            print(json.dumps({t.name: {"url": t.url, "pid": t.pid} for t in targets}), flush=True)
            time.sleep(args.hold)
        for t in targets:  # warm up connections, caches and JIT-less paths alike
            run_wrk(lua, t.url, max(args.concurrency), 1)
        by_name = {t.name: t for t in targets}
        for rep in range(args.repeats):
            for c in args.concurrency:
                for group in _groups(targets, by_name, args.paired):
                    with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                        futures = [pool.submit(measure, t, lua, c, args.duration) for t in group]
                        results = [f.result() for f in futures]
                    for t, r in zip(group, results, strict=True):
                        t.runs.setdefault(c, []).append(r)
                        print(f"  rep {rep + 1}/{args.repeats} c={c:<3} {t.name:<14} {r['rps']:9.0f} req/s  "
                              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                              f"cpu {r['cpu_ms_per_req']:.3f} ms/req  errors {r['errors']:.0f}", file=sys.stderr,
                              flush=True)
    finally:
        for p in reversed(procs):
            stop(p, timeout=10)
        if etcd is not None:
            etcd.stop()

    report = build_report(args, targets, identical, body, event_bytes)
    print_table(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def build_report(args: argparse.Namespace, targets: list[Target], identical: dict[str, bool], body: bytes,
                 event_bytes: int) -> dict[str, object]:
    points: dict[str, dict[str, dict[str, Any]]] = {
        t.name: {str(c): {"median": median_of(runs), "runs": runs} for c, runs in t.runs.items()}
              for t in targets}
    ratios: dict[str, dict[str, float]] = {}
    for t in targets:
        if not t.name.startswith("gateway"):
            continue
        for c in args.concurrency:
            gw = points[t.name][str(c)]["median"]
            out: dict[str, float] = {}
            peers = ["direct", "vllm-router", "naive-aiohttp", "ours-bare", "granian-rsgi", "uvicorn-httptools"]
            base = t.name.replace("gateway-", "base-")
            for peer in [*peers, base] if base in points and base != t.name else peers:
                if peer in points:
                    p = points[peer][str(c)]["median"]
                    key = peer.replace("-", "_")
                    out[f"rps_vs_{key}"] = round(gw["rps"] / p["rps"], 3)
                    out[f"p50_added_ms_vs_{key}"] = round(gw["p50_ms"] - p["p50_ms"], 3)
                    out[f"cpu_per_req_vs_{key}"] = round(gw["cpu_ms_per_req"] / max(p["cpu_ms_per_req"], 1e-9), 3)
            if base in points and base != t.name:   # per repetition (paired runs: measured at the same time)
                pairs = zip(points[t.name][str(c)]["runs"], points[base][str(c)]["runs"], strict=True)
                per_rep = [a["cpu_ms_per_req"] / max(b["cpu_ms_per_req"], 1e-9) for a, b in pairs]
                out["cpu_per_req_vs_base_per_rep_median"] = round(statistics.median(per_rep), 3)
            ratios[f"{t.name}@c{c}"] = out
    return {
        "meta": {
            "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version(),
            "nginx": tool_version(["nginx", "-v"]), "wrk": tool_version(["wrk", "--version"]),
            "vllm_router": _pkg_version("vllm-router"), "aiohttp": _pkg_version("aiohttp"),
            "duration_s": args.duration, "repeats": args.repeats, "chunks": args.chunks, "paired": args.paired,
            "body_bytes": len(body), "event_bytes": event_bytes, "body_identical": identical,
            "argv": sys.argv[1:], "unix_time": int(time.time()),
        },
        "points": points,
        "ratios": ratios,
    }


def _pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_table(report: dict[str, object]) -> None:
    meta: dict[str, Any] = report["meta"]  # type: ignore[assignment]
    points: dict[str, Any] = report["points"]  # type: ignore[assignment]
    print(f"\n{meta['cpus']} CPUs; {meta['chunks']} SSE events/response ({meta['body_bytes']} B); "
          f"{meta['duration_s']} s x {meta['repeats']} per point, medians")
    print(f"{'target':<15}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}{'errors':>8}")
    for name, by_c in points.items():
        for c, point in by_c.items():
            m = point["median"]
            print(f"{name:<15}{c:>5}{m['rps']:>10.0f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                  f"{m['cpu_ms_per_req']:>12.3f}{m['errors']:>8.0f}")
    ratios: dict[str, Any] = report["ratios"]  # type: ignore[assignment]
    for key, r in ratios.items():
        print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in r.items()))
    print(f"body identical through each target: {meta['body_identical']}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "naive-proxy":
        naive_proxy(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
