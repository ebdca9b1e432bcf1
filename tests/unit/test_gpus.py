"""GPU discovery: --gpus parsing, name normalisation, nvidia-smi output, visibility, the real subprocess path."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from agent.gpus import (
    GIB,
    GpuDiscoveryError,
    GpuInfo,
    RawGpu,
    discover_gpus,
    normalize_gpu_name,
    parse_gpu_override,
    parse_nvidia_smi_csv,
    query_nvidia_smi,
    select_visible,
    visible_devices,
)

MIB = 1024**2

# What `nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits` prints
# on a 4-GPU A100 node (UUIDs shortened).
SMI_A100X4 = """\
0, NVIDIA A100-SXM4-80GB, 81920, GPU-aaaa0000-1111
1, NVIDIA A100-SXM4-80GB, 81920, GPU-bbbb0000-2222
2, NVIDIA A100-SXM4-80GB, 81920, GPU-cccc0000-3333
3, NVIDIA A100-SXM4-80GB, 81920, GPU-dddd0000-4444
"""


# ---------------------------------------------------------------------------------------------
# --gpus override


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2xA100-80GB", [(0, "A100-80GB", 80 * GIB), (1, "A100-80GB", 80 * GIB)]),
        ("1xRTX4090", [(0, "RTX4090", 24 * GIB)]),
        ("rtx4090", [(0, "RTX4090", 24 * GIB)]),
        ("A100-80GB,L40S", [(0, "A100-80GB", 80 * GIB), (1, "L40S", 48 * GIB)]),
        (" 2 x H100-80GB , 1xGH200 ", [(0, "H100-80GB", 80 * GIB), (1, "H100-80GB", 80 * GIB), (2, "GH200", 96 * GIB)]),
        ("1xMYCARD:24GB", [(0, "MYCARD", 24 * GIB)]),
        ("1xMYCARD:24", [(0, "MYCARD", 24 * GIB)]),
        ("1xMYCARD:512MB", [(0, "MYCARD", 512 * MIB)]),
        ("1xMYCARD:1.5GiB", [(0, "MYCARD", int(1.5 * GIB))]),
        ("1xSIM-24GB", [(0, "SIM-24GB", 24 * GIB)]),
        ("3XT4", [(0, "T4", 16 * GIB), (1, "T4", 16 * GIB), (2, "T4", 16 * GIB)]),
    ],
)
def test_override_parses(text: str, expected: list[tuple[int, str, int]]) -> None:
    gpus = parse_gpu_override(text)
    assert [(g.index, g.type, g.memory_bytes) for g in gpus] == expected
    assert all(g.uuid == "" for g in gpus)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty item"),
        ("   ", "empty item"),
        ("A100-80GB,", "empty item"),
        ("A100-80GB,,L4", "empty item"),
        ("0xA100-80GB", "count must be 1..64"),
        ("65xA100-80GB", "count must be 1..64"),
        ("40xA100-80GB,40xL4", "at most 64 GPUs"),
        ("2xMYSTERY", "unknown GPU type 'MYSTERY' without a memory size; write it as MYSTERY:24GB"),
        ("1xFOO:0GB", "memory must be positive"),
        ("2x A100 80GB", "is not COUNTxTYPE[:MEMORY]"),
        ("-1xA100-80GB", "is not COUNTxTYPE[:MEMORY]"),
        ("1xA100:24TB", "is not COUNTxTYPE[:MEMORY]"),
    ],
)
def test_override_rejects_with_clear_message(text: str, message: str) -> None:
    with pytest.raises(GpuDiscoveryError) as err:
        parse_gpu_override(text)
    assert message in str(err.value)


def test_override_takes_visible_indices_when_counts_match() -> None:
    gpus = parse_gpu_override("2xL40S", visible=["2", "3"])
    assert [g.index for g in gpus] == [2, 3]
    # A count mismatch or UUIDs cannot be mapped one to one: number from 0.
    assert [g.index for g in parse_gpu_override("2xL40S", visible=["5"])] == [0, 1]
    assert [g.index for g in parse_gpu_override("1xL40S", visible=["GPU-abc"])] == [0]


def test_gpu_info_to_pb() -> None:
    pb = GpuInfo(index=3, type="A100-80GB", memory_bytes=80 * GIB, uuid="GPU-x").to_pb()
    assert (pb.index, pb.type, pb.memory_bytes, pb.uuid) == (3, "A100-80GB", 80 * GIB, "GPU-x")


# ---------------------------------------------------------------------------------------------
# Name normalisation


@pytest.mark.parametrize(
    ("name", "memory_mib", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA A800-SXM4-80GB", 81920, "A800-80GB"),
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
        ("NVIDIA H100 PCIe", 81559, "H100-80GB"),  # size from memory, snapped
        ("NVIDIA H100 NVL", 95830, "H100-NVL"),
        ("NVIDIA H200", 143771, "H200"),
        ("NVIDIA GH200 480GB", 97871, "GH200"),
        ("NVIDIA GH200 144G HBM3e", 146831, "GH200"),
        ("NVIDIA B200", 183359, "B200"),
        ("Tesla V100-SXM2-16GB", 16160, "V100-16GB"),
        ("Tesla V100-SXM2-32GB", 32768, "V100-32GB"),
        ("Tesla V100-PCIE-32GB", 32768, "V100-32GB"),
        ("Tesla T4", 15360, "T4"),
        ("NVIDIA L40S", 46068, "L40S"),
        ("NVIDIA L4", 23034, "L4"),
        ("NVIDIA A10G", 23028, "A10G"),
        ("NVIDIA GeForce RTX 4090", 24564, "RTX4090"),
        ("NVIDIA GeForce RTX 4090 D", 24564, "RTX4090"),
        ("NVIDIA GeForce RTX 3090 Ti", 24564, "RTX3090TI"),
        ("NVIDIA GeForce RTX 5090", 32607, "RTX5090"),
        ("NVIDIA RTX 6000 Ada Generation", 49140, "RTX6000-ADA"),
        ("NVIDIA RTX A6000", 49140, "A6000"),
        ("Quadro RTX 8000", 48601, "RTX8000"),
        ("NVIDIA TITAN RTX", 24220, "TITANRTX"),
        ("NVIDIA A100-SXM4-80GB", 0, "A100-80GB"),
        ("NVIDIA A100-SXM4", 0, "A100"),  # no size anywhere: the family alone
        ("Some Future Card", 1000, "SOME-FUTURE-CARD"),
        ("", 0, "UNKNOWN"),
    ],
)
def test_normalize_gpu_name(name: str, memory_mib: int, expected: str) -> None:
    assert normalize_gpu_name(name, memory_mib * MIB) == expected


# ---------------------------------------------------------------------------------------------
# nvidia-smi CSV


def test_parse_nvidia_smi_csv() -> None:
    raw = parse_nvidia_smi_csv(SMI_A100X4)
    assert raw[0] == RawGpu(index=0, name="NVIDIA A100-SXM4-80GB", memory_bytes=80 * GIB, uuid="GPU-aaaa0000-1111")
    assert [g.index for g in raw] == [0, 1, 2, 3]


def test_parse_nvidia_smi_csv_skips_garbage_and_reads_na_memory() -> None:
    text = (
        "\n"
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\n"
        "0, NVIDIA GeForce RTX 4090, [N/A], GPU-1234\n"
        "1, short line\n"
        "2, Weird, Name, 24564, GPU-5678\n"
    )
    raw = parse_nvidia_smi_csv(text)
    assert raw == [
        RawGpu(index=0, name="NVIDIA GeForce RTX 4090", memory_bytes=0, uuid="GPU-1234"),
        RawGpu(index=2, name="Weird,Name", memory_bytes=24564 * MIB, uuid="GPU-5678"),
    ]


# ---------------------------------------------------------------------------------------------
# Visibility


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"CUDA_VISIBLE_DEVICES": "1,3"}, ["1", "3"]),
        ({"CUDA_VISIBLE_DEVICES": " GPU-bbbb , 2 "}, ["GPU-bbbb", "2"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, []),
        ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "2,3"}, ["0"]),  # CUDA's own variable wins
        ({"SLURM_STEP_GPUS": "1", "SLURM_JOB_GPUS": "1,2"}, ["1"]),
        ({"SLURM_JOB_GPUS": "2,3"}, ["2", "3"]),
        ({"GPU_DEVICE_ORDINAL": "0,1"}, ["0", "1"]),
    ],
)
def test_visible_devices(env: dict[str, str], expected: list[str] | None) -> None:
    assert visible_devices(env) == expected


def test_select_visible_by_index_keeps_the_given_order() -> None:
    raw = parse_nvidia_smi_csv(SMI_A100X4)
    gpus = select_visible(raw, ["3", "1", "3"])
    assert [(g.index, g.type, g.uuid) for g in gpus] == [(3, "A100-80GB", "GPU-dddd0000-4444"),
                                                         (1, "A100-80GB", "GPU-bbbb0000-2222")]


def test_select_visible_by_uuid_and_uuid_prefix() -> None:
    raw = parse_nvidia_smi_csv(SMI_A100X4)
    assert [g.index for g in select_visible(raw, ["GPU-cccc0000-3333"])] == [2]
    assert [g.index for g in select_visible(raw, ["GPU-dddd", "0"])] == [3, 0]
    assert select_visible(raw, ["GPU-ffff"]) == []


def test_select_visible_none_means_all_and_empty_means_none() -> None:
    raw = parse_nvidia_smi_csv(SMI_A100X4)
    assert len(select_visible(raw, None)) == 4
    assert select_visible(raw, []) == []


def test_select_visible_renumbered_cgroup_view() -> None:
    # The job got the node's GPUs 1 and 2; its device cgroup shows them to NVML as 0 and 1.
    raw = parse_nvidia_smi_csv(SMI_A100X4)[:2]
    gpus = select_visible(raw, visible_devices({"SLURM_JOB_GPUS": "1,2"}))
    assert [g.index for g in gpus] == [0, 1]
    gpus = select_visible(raw, visible_devices({"SLURM_JOB_GPUS": "2,3"}))
    assert [g.index for g in gpus] == [0, 1]


def test_select_visible_unknown_indices_on_a_full_view_are_dropped() -> None:
    raw = parse_nvidia_smi_csv(SMI_A100X4)
    assert [g.index for g in select_visible(raw, ["1", "7"])] == [1]


# ---------------------------------------------------------------------------------------------
# The subprocess path, with a fake nvidia-smi on PATH


def _write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_smi_env(tmp_path: Path, body: str, **extra: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    _write_script(bindir, "nvidia-smi", body)
    return {"PATH": f"{bindir}:/usr/bin:/bin", **extra}


def test_fake_nvidia_smi_is_queried_with_the_csv_flags(tmp_path: Path) -> None:
    args_file = tmp_path / "args"
    env = _fake_smi_env(tmp_path, f'echo "$@" > {args_file}\ncat <<EOF\n{SMI_A100X4}EOF\n',
                        CUDA_VISIBLE_DEVICES="GPU-bbbb,3")
    gpus = discover_gpus(None, env, use_nvml=False)
    assert [(g.index, g.type, g.memory_bytes) for g in gpus] == [(1, "A100-80GB", 80 * GIB), (3, "A100-80GB", 80 * GIB)]
    assert args_file.read_text().split() == ["--query-gpu=index,name,memory.total,uuid",
                                             "--format=csv,noheader,nounits"]


def test_fake_nvidia_smi_with_slurm_variables(tmp_path: Path) -> None:
    env = _fake_smi_env(tmp_path, f"cat <<EOF\n{SMI_A100X4}EOF\n", SLURM_STEP_GPUS="0,2")
    assert [g.index for g in discover_gpus(None, env, use_nvml=False)] == [0, 2]


def test_failing_nvidia_smi_gives_a_helpful_error(tmp_path: Path) -> None:
    env = _fake_smi_env(tmp_path, "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert query_nvidia_smi(env) is None
    with pytest.raises(GpuDiscoveryError, match="--gpus 2xA100-80GB"):
        discover_gpus(None, env, use_nvml=False)


def test_hanging_nvidia_smi_times_out(tmp_path: Path) -> None:
    env = _fake_smi_env(tmp_path, "exec sleep 30\n")
    started = time.monotonic()
    assert query_nvidia_smi(env, timeout_s=0.5) is None
    assert time.monotonic() - started < 5


def test_visible_devices_that_do_not_exist_are_named_in_the_error(tmp_path: Path) -> None:
    env = _fake_smi_env(tmp_path, f"cat <<EOF\n{SMI_A100X4}EOF\n", CUDA_VISIBLE_DEVICES="GPU-ffff")
    with pytest.raises(GpuDiscoveryError, match=r"visible devices: GPU-ffff"):
        discover_gpus(None, env, use_nvml=False)


def test_no_gpu_and_no_override_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GpuDiscoveryError) as err:
        discover_gpus(None, {"PATH": str(empty)}, use_nvml=False)
    message = str(err.value)
    assert "no GPU found via NVML or nvidia-smi" in message and "--gpus" in message


def test_override_wins_over_detection(tmp_path: Path) -> None:
    env = _fake_smi_env(tmp_path, f"cat <<EOF\n{SMI_A100X4}EOF\n", CUDA_VISIBLE_DEVICES="1,2")
    gpus = discover_gpus("2xSIM-24GB", env, use_nvml=False)
    assert [(g.index, g.type) for g in gpus] == [(1, "SIM-24GB"), (2, "SIM-24GB")]


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA driver on this host")
def test_real_discovery_on_a_gpu_host() -> None:
    gpus = discover_gpus(None, os.environ)
    assert gpus and all(g.memory_bytes > 0 and g.type for g in gpus)
