"""`ctl dev` on SIGHUP (its terminal closed): every child stopped, the temp dir removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.netutil import free_port
from tests.e2e.test_dev_cluster import _alive, _descendants, _read_until_ready

pytestmark = pytest.mark.e2e


def test_sighup_stops_everything_and_removes_the_temp_dir(tmp_path: Path) -> None:
    gw_port, etcd_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli.main", "dev", "--gateway-port", str(gw_port),
         "--etcd-port", str(etcd_port), "--models", "hup-model"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},   # its temp dir lands here, where we can look
    )
    try:
        _read_until_ready(proc, timeout=90)
        assert [p.name for p in tmp_path.glob("modelpool-dev-*")], "ctl dev made no temp dir"
        tree = _descendants(proc.pid)
        assert len(tree) >= 3  # etcd, gateway, agent (+ engine)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        survivors = {pid: cmd.replace(b"\0", b" ")[:120] for pid, cmd in tree.items() if _alive(pid, cmd)}
        assert survivors == {}, f"processes left behind: {survivors}"
        assert list(tmp_path.glob("modelpool-dev-*")) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
