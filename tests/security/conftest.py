"""One gateway for the edge security tests: `ctl gateway` with auth on, short deadlines, real sims."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controlplane.etcdproc import EtcdProcess
from tests.cluster import Sim
from tests.security.edge import World, new_world, stop_world

# Short deadlines so that the tests that wait for them stay short; the budget is small enough
# that a few bodies fill it.
FLAGS = ("--head-timeout", "3", "--body-timeout", "4", "--write-timeout", "3", "--linger-timeout", "3",
         "--keepalive-timeout", "10", "--body-budget-mb", "64")


@pytest.fixture(scope="session")
def world(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("edge")
    fast = ("--ttft-ms", "1", "--tokens-per-s", "0")
    sims = {"pub": [Sim("pub", tmp, *fast) for _ in range(3)],
            "secret": [Sim("secret", tmp, *fast)],
            "slow": [Sim("slow", tmp, "--ttft-ms", "1", "--tokens-per-s", "40")],
            "flaky": [Sim("flaky", tmp, *fast, "--error-rate", "1"), Sim("flaky", tmp, *fast),
                      Sim("flaky", tmp, *fast)]}
    w = new_world(etcd_server.endpoint, tmp, sims, FLAGS)
    yield w
    stop_world(w)
