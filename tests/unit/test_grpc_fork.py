"""gRPC's fork handlers are off in every modelpool process (see controlplane/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_importing_the_store_turns_grpc_fork_handlers_off_before_grpc_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    code = ("import sys; import controlplane.store; import grpc; "
            "import os; print(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "false"


def test_an_explicit_setting_wins() -> None:
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"}
    code = "import controlplane.store, os; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "true"
