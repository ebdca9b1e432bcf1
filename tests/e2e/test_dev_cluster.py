"""`ctl dev` end to end: up, stream a chat completion with the openai client, status, clean shutdown."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from controlplane.netutil import free_port

pytestmark = pytest.mark.e2e


def _descendants(root: int) -> dict[int, bytes]:
    """pid -> cmdline of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, bytes] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            todo.append(child)
    return out


def _alive(pid: int, cmdline: bytes) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and (Path("/proc") / str(pid) / "cmdline").read_bytes() == cmdline
    except OSError:
        return False


def _read_until_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith("ready "):
                return line
        if proc.poll() is not None:
            break
    raise AssertionError(f"ctl dev did not get ready (exit {proc.poll()}); stdout: {''.join(seen)}")


def test_ctl_dev_serves_streams_reports_and_stops_cleanly(tmp_path: Path) -> None:
    gw_port, etcd_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli.main", "dev", "--gateway-port", str(gw_port),
         "--etcd-port", str(etcd_port), "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        line = _read_until_ready(proc, timeout=90)
        assert f"gateway=http://127.0.0.1:{gw_port}/v1" in line

        client = OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="dev", max_retries=0)
        models = {m.id for m in client.models.list()}
        assert {"demo-chat", "demo-code"} <= models
        stream = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "Say hello"}], stream=True, max_tokens=8,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert len([p for p in pieces if p]) >= 2, pieces
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == 8

        status = subprocess.run(
            [sys.executable, "-m", "controlplane.cli.main", "status", "-o", "json", "--etcd", f"127.0.0.1:{etcd_port}"],
            capture_output=True, text=True, timeout=30, env={**os.environ, "MODELPOOL_ETCD_PREFIX": "/modelpool"},
        )
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        ready = sorted(i["model"] for i in data["instances"] if i["state"] == "READY")
        assert ready == ["demo-chat", "demo-code"]
        assert len(data["nodes"]) == 2
        assert len(data["gateways"]) == 1 and data["gateways"][0]["address"].endswith(f":{gw_port}")
        assert {m["model"] for m in data["models"]} == {"demo-chat", "demo-code"}
        table = subprocess.run(
            [sys.executable, "-m", "controlplane.cli.main", "status", "--etcd", f"127.0.0.1:{etcd_port}"],
            capture_output=True, text=True, timeout=30,
        )
        assert "demo-chat" in table.stdout and "READY" in table.stdout and "Gateways (1)" in table.stdout

        tree = _descendants(proc.pid)
        assert len(tree) >= 5  # etcd, gateway, 2 agents, 2 engines (and possibly gateway workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        survivors = {pid: cmd.replace(b"\0", b" ")[:120] for pid, cmd in tree.items() if _alive(pid, cmd)}
        assert survivors == {}, f"processes left behind: {survivors}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
