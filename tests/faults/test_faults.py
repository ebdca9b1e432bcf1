"""Rows of the fault table (bench/faults.py) that CI can assert in bounded time, at reduced scale.

Real etcd, three `ctl agent`s with sim engines (lease TTL 3 s) and a `ctl gateway`, a steady
streamed load, one fault each. The full-length runs and their table: docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import SCENARIOS, run_scenario

pytestmark = pytest.mark.e2e


async def _row(name: str, tmp_path: Path, scale: float):  # type: ignore[no-untyped-def]
    row = await run_scenario(SCENARIOS[name], rate=15, ttl=3, warm_s=2.0, post_s=4.0, scale=scale, workdir=tmp_path)
    print(f"\n{row}")
    return row


async def test_hung_etcd_longer_than_the_lease_ttl_fails_no_request_and_shows_in_readyz(tmp_path: Path) -> None:
    row = await _row("hung-etcd", tmp_path, scale=0.25)     # 7.5 s stopped, more than two TTLs
    assert row.sent > 150
    assert row.failed == 0, row.failures
    assert row.notes["readyz_degraded_after_s"] is not None and row.notes["readyz_degraded_after_s"] < 5.0
    assert row.notes["readyz_ok_after_resume_s"] is not None


async def test_a_stopped_agent_loses_its_lease_and_no_request_fails(tmp_path: Path) -> None:
    row = await _row("agent-sigstop", tmp_path, scale=0.3)   # 6 s stopped: its lease (3 s) expires
    assert row.sent > 150
    assert row.failed == 0, row.failures
