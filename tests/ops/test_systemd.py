"""ops/systemd: the units are valid systemd units (``systemd-analyze verify``, or a structural
check where systemd is absent) and each ExecStart is a command line the real `ctl` parses."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.ops.ctlparse import parse_ctl

UNITS = sorted((Path(__file__).resolve().parents[2] / "ops" / "systemd").glob("*.service"))
SPECIFIERS = {"%H": "gw-host-1", "%h": "/home/modelpool", "%n": "unit.service", "%i": "instance"}
# What a unit here may contain; a misspelt key is a unit that silently does less than it says.
KNOWN_KEYS = {
    "Unit": {"Description", "Documentation", "After", "Wants", "Requires", "Before"},
    "Service": {"Type", "User", "Group", "EnvironmentFile", "Environment", "ExecStart", "KillSignal", "KillMode",
                "TimeoutStopSec", "TimeoutStartSec", "Restart", "RestartSec", "LimitNOFILE", "NoNewPrivileges",
                "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "StateDirectory",
                "StateDirectoryMode"},
    "Install": {"WantedBy"},
}


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def exec_start(path: Path) -> list[str]:
    line = read_unit(path)["Service"]["ExecStart"]
    for spec, value in SPECIFIERS.items():
        line = line.replace(spec, value)
    return shlex.split(line)


def test_there_are_units_for_gateway_planner_and_etcd() -> None:
    assert {p.stem for p in UNITS} >= {"modelpool-gateway", "modelpool-planner", "modelpool-etcd"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_structure(unit: Path) -> None:
    parser = read_unit(unit)
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    for section in parser.sections():
        unknown = set(parser[section]) - KNOWN_KEYS[section]
        assert not unknown, f"{unit.name} [{section}]: unknown keys {sorted(unknown)}"
    assert parser["Service"]["User"] != "root" and parser["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (systemd)")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # the programs need not be installed here: point ExecStart at a stand-in that exists
    program = tmp_path / "program"
    program.write_text("#!/bin/sh\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    text = re.sub(r"^ExecStart=(\S+)", f"ExecStart={program}", unit.read_text(), flags=re.MULTILINE)
    copy = tmp_path / unit.name
    copy.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60,
                         check=False)
    problems = [line for line in out.stderr.splitlines()
                if re.search(r"Unknown|unknown|bad|Failed|Invalid|invalid|Refusing|not safe", line)]
    assert out.returncode == 0 and not problems, out.stderr


@pytest.mark.parametrize("unit", [u for u in UNITS if "etcd" not in u.name], ids=lambda p: p.name)
def test_exec_start_is_a_real_ctl_command(unit: Path) -> None:
    argv = exec_start(unit)
    assert Path(argv[0]).name == "ctl"
    parse_ctl(argv[1:])


def test_etcd_unit_compacts_and_has_a_quota() -> None:
    [etcd] = [u for u in UNITS if u.stem == "modelpool-etcd"]
    argv = exec_start(etcd)
    assert "--auto-compaction-mode=periodic" in argv and "--auto-compaction-retention=1h" in argv
    assert any(a.startswith("--quota-backend-bytes=") for a in argv)
