"""Exit codes of `ctl`: a missing plan file is a usage error; etcd unreachable is 5, daemons included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from controlplane.cli import common
from controlplane.cli.common import ExitCode, run_async
from controlplane.store import StoreUnavailable, TxnConflict

CTL = [sys.executable, "-m", "controlplane.cli.main"]


@pytest.mark.parametrize("content", [None, "{", '{"format": "modelpool-plan/v1"}'])
def test_apply_of_a_missing_or_malformed_plan_file_exits_2(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    res = subprocess.run([*CTL, "apply", str(path), "--etcd", "127.0.0.1:1"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == ExitCode.USAGE, res.stderr
    assert res.stderr.startswith(f"error: {path}: ")


@pytest.mark.parametrize("exc, code", [(StoreUnavailable("etcd away"), ExitCode.UNAVAILABLE),
                                       (TxnConflict("lost a race"), ExitCode.CONFLICT)])
def test_a_daemon_that_fails_on_etcd_exits_with_its_code_even_through_the_watchdog(
        monkeypatch: pytest.MonkeyPatch, exc: Exception, code: ExitCode) -> None:
    armed: list[int] = []
    monkeypatch.setattr(common, "exit_watchdog", lambda within_s, c: armed.append(c))

    async def daemon() -> None:
        raise exc

    with pytest.raises(typer.Exit) as info:
        run_async(daemon, exit_within_s=10)
    assert info.value.exit_code == code
    assert armed == [code]   # if teardown hangs, the watchdog exits with the same code, not 255
