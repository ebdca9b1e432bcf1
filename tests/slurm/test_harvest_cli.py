"""`ctl harvest` against a real Slurm: bad input is exit 2 at start; `plan` exits like `ctl plan`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from slurmcluster import SlurmCluster

from controlplane.etcdproc import EtcdProcess
from controlplane.harvest.daemon import job_name
from tests.cluster import CTL

pytestmark = pytest.mark.slurm

CLUSTER = {"gpu_types": {"A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
                         "RTX4090": {"price_per_hour": 1.0, "relative_speed": 1.0}},
           "reference_rps": {"cli-m": 10.0}}
GRES = ("--gres-type", "a100=A100-80GB", "--gres-type", "rtx4090=RTX4090")


async def ctl(cluster: SlurmCluster, etcd: EtcdProcess, prefix: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*CTL, *args, "--etcd", etcd.endpoint, "--etcd-prefix", prefix,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=cluster.env)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(CLUSTER))
    return path


async def test_bad_input_is_exit_2_at_start_with_the_reason(slurm_cluster: SlurmCluster, etcd_server: EtcdProcess,
                                                            etcd_prefix: str, cluster_file: Path) -> None:
    """The wiring: Slurm is asked at start and the checks' messages reach stderr (their logic:
    tests/unit/test_harvest_config.py)."""
    cases = [
        ("run", ("--partition", "nope", *GRES), "unknown partition 'nope'; Slurm has: debug"),
        ("run", ("--partition", "debug", "--gres-type", "a100=A100-80GB"), "GRES type 'rtx4090' (on "),
        ("plan", ("--partition", "debug", "--gres-type", "a100=A100-40GB", "--gres-type", "rtx4090=RTX4090"),
         "GPU type 'A100-40GB' (--gres-type a100=A100-40GB) has no price"),
    ]
    results = await asyncio.gather(*(ctl(slurm_cluster, etcd_server, etcd_prefix, "harvest", command, "--cluster",
                                         str(cluster_file), *args) for command, args, _ in cases))
    for (command, _, message), (code, _, err) in zip(cases, results, strict=True):
        assert code == 2, (command, err)
        assert message in err, (command, err)


async def test_leaving_a_type_alone_is_explicit_and_plan_exits_like_ctl_plan(
        slurm_cluster: SlurmCluster, etcd_server: EtcdProcess, etcd_prefix: str, cluster_file: Path,
        tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "cli-m", "engine": "sim", "weight_memory_gib": 16}]}))
    code, _, err = await ctl(slurm_cluster, etcd_server, etcd_prefix, "models", "apply", "-f", str(catalog))
    assert code == 0, err
    base = ("harvest", "plan", "--cluster", str(cluster_file), "--partition", "debug", "--gres-type", "a100=",
            "--gres-type", "rtx4090=RTX4090", "-o", "json")
    code, out, err = await ctl(slurm_cluster, etcd_server, etcd_prefix, *base)
    assert code == 0, err                      # no demand: nothing to do
    assert json.loads(out)["changes"] is False
    demand = tmp_path / "demand.yaml"
    demand.write_text(yaml.safe_dump({"cli-m": 5.0}))
    code, out, err = await ctl(slurm_cluster, etcd_server, etcd_prefix, *base, "--demand", str(demand))
    assert code == 1, err                      # changes: a job to submit, and why
    plan = json.loads(out)
    (submit,) = plan["submit"]
    assert submit["gres"] == "gpu:rtx4090:1" and submit["models"] == ["cli-m"] and "cli-m" in submit["reason"]
    assert slurm_cluster._command(["squeue", "-h", "-t", "all", "-n", job_name(etcd_prefix)]).strip() == ""
    code, out, _ = await ctl(slurm_cluster, etcd_server, etcd_prefix, "harvest", "status", "-o", "json")
    assert code == 0 and json.loads(out)["jobs"] == []
