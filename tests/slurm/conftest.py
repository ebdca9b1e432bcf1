"""The `slurm_cluster` fixture: one real single-node Slurm for the session, or a skip saying why."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the slurmcluster helper

from slurmcluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A private munged + slurmctld + slurmd on this host (needs root and slurm-wlm + munge)."""
    cluster = SlurmCluster.in_temp_dir()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        print(f"slurm_cluster unavailable: {exc}", file=sys.stderr)
        pytest.skip(f"no Slurm test cluster: {exc}")
    yield cluster
    cluster.stop()
