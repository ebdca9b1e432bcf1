"""Start-time checks of `ctl harvest`: unknown partitions, unmapped GRES types, unpriced GPU types."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.harvest.config import check_settings, parse_gres_types
from controlplane.harvest.errors import HarvestConfigError
from controlplane.harvest.slurm import parse_scontrol_nodes, parse_sinfo_partitions
from controlplane.planner.live import ClusterConfig

DATA = Path(__file__).parent / "data"
CLUSTER = ClusterConfig.model_validate({"gpu_types": {
    "A100-80GB": {"price_per_hour": 2.0, "relative_speed": 2.0},
    "RTX4090": {"price_per_hour": 0.8, "relative_speed": 1.0}}, "horizon_s": 1800})
PARTS = parse_sinfo_partitions((DATA / "slurm-24.05/sinfo.txt").read_text())
NODES = parse_scontrol_nodes((DATA / "slurm-24.05/scontrol.txt").read_text())


def check(partitions: tuple[str, ...], gres: list[str], time_s: int = 4 * 3600) -> tuple[list[str], list[str]]:
    return check_settings(partitions, parse_gres_types(gres), time_s, CLUSTER, PARTS, NODES)


def test_a_complete_configuration_has_no_problems() -> None:
    problems, warnings = check(("consumer",), ["rtx4090=RTX4090"])
    assert problems == [] and warnings == []


def test_unknown_partition_names_what_slurm_has() -> None:
    problems, _ = check(("gpus",), [])
    assert problems == ["unknown partition 'gpus'; Slurm has: consumer, cpu, gpu, maint, preempt"]


def test_every_gres_type_needs_a_mapping_or_an_explicit_skip() -> None:
    problems, _ = check(("preempt",), ["rtx4090=RTX4090"])
    assert len(problems) == 1 and problems[0].startswith("GRES type 'a100' (on gpu-a01, gpu-a02) has no --gres-type")
    problems, _ = check(("preempt",), ["rtx4090=RTX4090", "a100="])
    assert problems == []


def test_a_mapped_type_needs_a_price_and_a_memory_size() -> None:
    problems, _ = check(("gpu",), ["a100=A100-40GB", "h100=H100-80GB"])
    assert any("'A100-40GB' (--gres-type a100=A100-40GB) has no price" in p for p in problems)
    with pytest.raises(HarvestConfigError, match="without a memory size"):
        parse_gres_types(["x=NONAME"])
    mapping = parse_gres_types(["x=NONAME:20GB", "a100=A100-80GB"])
    assert mapping.types == {"x": "NONAME", "a100": "A100-80GB"} and mapping.memory_gib == {"NONAME": 20.0,
                                                                                            "A100-80GB": 80.0}


def test_time_limit_against_maxtime_and_the_planner_horizon() -> None:
    problems, _ = check(("consumer",), ["rtx4090=RTX4090"], time_s=13 * 3600)
    assert problems == ["--time 780 min exceeds partition 'consumer''s MaxTime (720 min)"]
    problems, _ = check(("consumer",), ["rtx4090=RTX4090"], time_s=1800)
    assert len(problems) == 1 and "within the planner's horizon" in problems[0]


def test_down_partitions_and_unseen_mappings_are_warnings() -> None:
    problems, warnings = check(("maint", "consumer"), ["rtx4090=RTX4090", "l40s=L40S"])
    assert any("GPU type 'L40S'" in p for p in problems)
    assert any("partition 'maint' is not up" in w for w in warnings)
    assert any("--gres-type l40s: no node" in w for w in warnings)


@pytest.mark.parametrize("item", ["a100", "=A100-80GB"])
def test_malformed_items(item: str) -> None:
    with pytest.raises(HarvestConfigError, match="expects SLURM_TYPE=GPU_TYPE"):
        parse_gres_types([item])


def test_a_type_given_twice() -> None:
    with pytest.raises(HarvestConfigError, match="given twice"):
        parse_gres_types(["a100=A100-80GB", "a100=A100-40GB"])
