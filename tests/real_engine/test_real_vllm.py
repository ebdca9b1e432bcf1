"""A real vLLM (CPU build, tiny random-weights Llama) behind `ctl agent --engine vllm` and a gateway.

Opt-in: ``bash bench/real_vllm.sh`` then ``python -m pytest -m real_engine`` (docs/engines.md has
the timings). One agent starts one vLLM (~1.5 min to ready on 2 cores, ~3 GB RSS) for the module;
the tests then compare the official ``openai`` client's answers through the gateway with the same
engine asked directly at temperature 0, check what the agent recorded (CPU mode, port range, the
engine's model card), profile it through the gateway, and drain it with SIGTERM mid-stream.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import pytest

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.netutil import free_port
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.procs import spawn, stop_all
from controlplane.store import EtcdConfig, EtcdStore
from tests.cluster import CTL, start_gateway
from tests.ops.promql import exported_names, metric_names
from tests.ops.test_grafana import queries
from tests.real_engine.conftest import tiny_model, vllm_venv

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
READY_TIMEOUT_S = 600.0
PROMPTS = ["hello pool", "what is the gateway", "one two three four five six seven"]


def _tiny_model_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_model", REPO / "bench" / "tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Pool:
    """The running pool: an agent with a vLLM engine, a gateway, and where to reach them."""

    agent: subprocess.Popen[bytes]
    agent_log: Path
    gateway_url: str
    engine_url: str
    record: InstanceRecord
    ports: tuple[int, int]
    config: EtcdConfig


async def _instances(config: EtcdConfig) -> list[InstanceRecord]:
    store = await EtcdStore(config).connect()
    try:
        kvs, _ = await store.list_prefix(Keys(config.prefix).instances)
        return [decode(InstanceRecord, kv) for kv in kvs]
    finally:
        await store.close()


def _wait_ready(config: EtcdConfig, agent: subprocess.Popen[bytes], log: Path) -> InstanceRecord:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited with {agent.returncode}:\n{log.read_text()[-3000:]}")
        ready = [r for r in asyncio.run(_instances(config)) if r.state == InstanceState.READY]
        if ready:
            return ready[0]
        time.sleep(2)
    raise AssertionError(f"vLLM not READY after {READY_TIMEOUT_S:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def pool(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tiny = _tiny_model_module()
    tmp = tmp_path_factory.mktemp("real-vllm")
    prefix = f"/mp-real-{os.getpid()}"
    config = EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix, timeout_s=5.0)
    low = free_port()
    ports = (low, min(low + 20, 65535))
    env = {**os.environ, **tiny.VLLM_ENV, "PATH": f"{vllm_venv() / 'bin'}:{os.environ.get('PATH', '')}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log = tmp / "agent.log"
    argv = [*CTL, "agent", "--etcd", etcd_server.endpoint, "--etcd-prefix", prefix, "--serve", MODEL,
            "--engine", "vllm", "--source", str(tiny_model()), "--cpu", "--engine-port-range", f"{ports[0]}-{ports[1]}",
            "--node-id", "cpu-host", "--log-dir", str(tmp / "engines"), "--drain-grace", "30",
            "--startup-timeout", str(int(READY_TIMEOUT_S)), *(f"--engine-arg={a}" for a in tiny.VLLM_SERVE_ARGS)]
    agent = spawn(argv, log, env=env)
    procs = [agent]
    try:
        started = time.monotonic()
        record = _wait_ready(config, agent, log)
        print(f"vLLM READY through the agent in {time.monotonic() - started:.1f}s")
        gw, url = start_gateway(etcd_server.endpoint, prefix, tmp, "--no-auth")
        procs.append(gw)
        yield Pool(agent, log, url, record.endpoint, record, ports, config)
    finally:
        stop_all(procs, timeout=40)


def _engine_pids(port: int) -> list[int]:
    """Processes whose command line serves ``--port port`` (vLLM's API server; its workers are children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and b"--served-model-name" in argv:
            pids.append(int(entry.name))
    return pids


def test_agent_records_cpu_engine_port_range_and_model_card(pool: Pool) -> None:
    rec = pool.record
    assert rec.engine == "vllm" and rec.gpu_type == "CPU" and list(rec.gpu_indices) == []
    port = int(rec.endpoint.rsplit(":", 1)[1])
    assert pool.ports[0] <= port <= pool.ports[1]
    assert rec.max_model_len == 1024 and rec.model_root == str(tiny_model())
    pids = _engine_pids(port)
    assert pids, f"no process serves port {port}"
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"CUDA_VISIBLE_DEVICES=") for v in environ)

    via_gateway = openai.OpenAI(base_url=f"{pool.gateway_url}/v1", api_key="unused").models.list()
    direct = openai.OpenAI(base_url=f"{pool.engine_url}/v1", api_key="unused").models.list()
    [card] = [m for m in via_gateway.data if m.id == MODEL]
    [engine_card] = direct.data
    for name in ("max_model_len", "root", "parent"):
        assert getattr(card, name) == getattr(engine_card, name), name
    assert card.max_model_len == 1024  # type: ignore[attr-defined]  # vLLM's extra field


def test_answers_through_the_gateway_equal_direct_ones_at_temperature_0(pool: Pool) -> None:
    gw = openai.OpenAI(base_url=f"{pool.gateway_url}/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=f"{pool.engine_url}/v1", api_key="unused", max_retries=0)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        kwargs: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0}
        a = gw.chat.completions.create(**kwargs)
        b = direct.chat.completions.create(**kwargs)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.usage == b.usage and a.choices[0].finish_reason == b.choices[0].finish_reason
        stream = gw.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == b.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == b.usage.completion_tokens

        c = gw.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
        d = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
        assert c.choices[0].text == d.choices[0].text
        assert c.choices[0].logprobs and d.choices[0].logprobs
        assert c.choices[0].logprobs.tokens == d.choices[0].logprobs.tokens


def test_engine_exports_the_metrics_the_dashboard_and_the_drain_use(pool: Pool) -> None:
    with urllib.request.urlopen(f"{pool.engine_url}/metrics", timeout=30) as resp:
        exported = exported_names(resp.read().decode())
    board = json.loads((REPO / "ops" / "grafana" / "dashboards" / "modelpool.json").read_text())
    wanted = {n for _, expr in queries(board) for n in metric_names(expr) if n.startswith("vllm:")}
    assert wanted and wanted <= exported, wanted - exported
    # what agent/supervisor.py counts to know when a drain may stop the engine
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting"} <= exported


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return dict(json.loads(resp.read()))


def test_tokenize_through_the_gateway(pool: Pool) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[1]}
    assert _post(f"{pool.gateway_url}/v1/tokenize", body) == _post(f"{pool.engine_url}/tokenize", body)


def test_profile_through_the_gateway_fits_its_prompts_to_max_model_len(pool: Pool, tmp_path: Path) -> None:
    # the default prefill-heavy prompt (1024 words) exceeds this 1024-token model: profile must shrink it
    out = subprocess.run([*CTL, "profile", "--url", pool.gateway_url, "--model", MODEL, "--gpu-type", "CPU",
                          "--tp", "1", "--concurrency", "2", "--duration", "8", "-o", "json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    print(f"profile through the gateway: {json.dumps(result)}")  # recorded in docs/engines.md (-s)
    assert any("prefill-heavy" in n and "max_model_len 1024" in n for n in result["notes"]), result["notes"]
    assert all(m["errors"] == 0 and m["requests"] > 0 for m in result["mixes"]), result["mixes"]
    assert result["profile"]["requests_per_s"] > 0


def test_sigterm_drains_a_stream_in_flight_then_exits(pool: Pool) -> None:
    gw = openai.OpenAI(base_url=f"{pool.gateway_url}/v1", api_key="unused", max_retries=0)
    stream = gw.completions.create(model=MODEL, prompt="drain me", max_tokens=400, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
    pieces = []
    it = iter(stream)
    pieces.append(next(it))
    sent = time.monotonic()
    pool.agent.send_signal(signal.SIGTERM)
    pieces.extend(it)
    finish = [c.choices[0].finish_reason for c in pieces if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"], finish  # the stream ran to its end, not cut by the drain
    assert pool.agent.wait(timeout=60) == 0
    assert time.monotonic() - sent < 60
    assert asyncio.run(_instances(pool.config)) == []
    assert "drain complete" in pool.agent_log.read_text()
