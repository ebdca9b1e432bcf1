"""controlplane.procs: the exit watchdog and the parent-death signal, on real child processes."""

from __future__ import annotations

import subprocess
import sys
import time

HANGING_TEARDOWN = """
import threading, time
from controlplane.procs import exit_watchdog
exit_watchdog(0.3, 7)
threading.Thread(target=time.sleep, args=(60,)).start()  # a non-daemon thread: exit would join it
"""

QUICK_EXIT = """
from controlplane.procs import exit_watchdog
exit_watchdog(30, 7)
"""


def run(code: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return done, time.monotonic() - started


def test_watchdog_ends_a_hanging_teardown_with_its_code() -> None:
    done, took = run(HANGING_TEARDOWN)
    assert done.returncode == 7, done.stderr
    assert "teardown still running 0.3s after the work finished; exiting 7" in done.stderr
    assert took < 20


def test_watchdog_does_not_delay_or_change_a_clean_exit() -> None:
    done, took = run(QUICK_EXIT)
    assert done.returncode == 0 and done.stderr == ""
    assert took < 20


def test_spawned_child_dies_with_its_parent(tmp_path) -> None:
    # the parent spawns a sleeper and is killed; PR_SET_PDEATHSIG must take the sleeper down too
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from controlplane.procs import spawn\n"
        "p = spawn([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n")])
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait(10)
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{child}/stat") as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break  # exited; a zombie until init reaps it
            except FileNotFoundError:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"child {child} outlived its parent")
    finally:
        parent.kill()
