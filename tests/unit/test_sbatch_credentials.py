"""The sbatch templates hand etcd credentials to the agent as a file, never as a value (no Slurm needed:
the templates run as plain bash outside a job, with a stand-in `ctl` that reports what it got)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAND_IN = """import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "env_password": os.environ.get("MODELPOOL_ETCD_PASSWORD")}))
"""


def run(template: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    ctl = tmp_path / "ctl"
    ctl.write_text(f"#!{sys.executable}\n{STAND_IN}")
    ctl.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MODELPOOL_"))}
    return subprocess.run(["bash", str(REPO / "ops" / "slurm" / template)], env={
        **base, "ETCD": "127.0.0.1:1", "MODEL": "m1", "CTL": str(ctl), **env},
        capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("template", ["serve.sbatch", "pool.sbatch"])
def test_password_goes_by_file_and_never_by_value(template: str, tmp_path: Path) -> None:
    secret = "hunter2-" + template
    pw = tmp_path / "etcd.pw"
    pw.write_text(secret + "\n")
    pw.chmod(0o600)
    res = run(template, tmp_path, ETCD_USER="tenant-nlp", ETCD_PASSWORD_FILE=str(pw), TENANT="nlp",
              MODELPOOL_ETCD_PASSWORD=secret)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    argv = got["argv"]
    assert argv[argv.index("--etcd-user") + 1] == "tenant-nlp"
    assert argv[argv.index("--etcd-password-file") + 1] == str(pw)
    assert argv[argv.index("--tenant") + 1] == "nlp"
    assert secret not in " ".join(argv) and secret not in res.stdout.replace(json.dumps(got), "")
    assert got["env_password"] is None and "ignoring it" in res.stderr

    pw.chmod(0o644)
    assert "readable by others" in run(template, tmp_path, ETCD_USER="tenant-nlp", ETCD_PASSWORD_FILE=str(pw)).stderr
    missing = run(template, tmp_path, ETCD_USER="tenant-nlp")
    assert missing.returncode != 0 and "ETCD_PASSWORD_FILE" in missing.stderr
    unreadable = run(template, tmp_path, ETCD_USER="tenant-nlp", ETCD_PASSWORD_FILE=str(tmp_path / "nope"))
    assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr
    plain = json.loads(run(template, tmp_path).stdout.splitlines()[-1])["argv"]   # auth off: no credentials
    assert "--etcd-user" not in plain and "--etcd-password-file" not in plain
