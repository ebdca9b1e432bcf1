"""Checks made once at start, so bad input is a clear error (exit 2) and never a silent skip.

* every ``--partition`` exists (and ``--time`` fits its MaxTime);
* every GPU GRES type on the nodes of those partitions has a ``--gres-type`` mapping (map a type
  to nothing, ``v100=``, to leave it alone on purpose);
* every mapped pool GPU type has a price in the cluster file, and a known memory size (from its
  name, as the agent's ``--gpus`` knows it, or written ``TYPE:24GB``);
* the job time limit outlasts the planner's horizon (else no model would ever be placed on it).

Pure: ``check_settings`` takes what Slurm said and returns the problems and warnings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.gpus import GpuDiscoveryError, parse_gpu_override
from controlplane.harvest.errors import HarvestConfigError
from controlplane.harvest.slurm import Partition, SlurmNode
from controlplane.planner.live import ClusterConfig


@dataclass(frozen=True)
class GresMapping:
    """``--gres-type`` parsed: Slurm type -> pool GPU type ("" = leave it), and memory per pool type."""

    types: dict[str, str]
    memory_gib: dict[str, float]


def parse_gres_types(items: Sequence[str]) -> GresMapping:
    """``["a100=A100-80GB", "l40s=L40S", "old=", "mine=MYGPU:24GB"]`` -> a GresMapping.

    Raises HarvestConfigError naming the item."""
    types: dict[str, str] = {}
    memory: dict[str, float] = {}
    for item in items:
        slurm_type, sep, value = item.partition("=")
        slurm_type = slurm_type.strip()
        if not sep or not slurm_type:
            raise HarvestConfigError(f"--gres-type expects SLURM_TYPE=GPU_TYPE (e.g. a100=A100-80GB), got {item!r}")
        if slurm_type in types:
            raise HarvestConfigError(f"--gres-type {slurm_type!r} is given twice")
        value = value.strip()
        if not value:
            types[slurm_type] = ""
            continue
        try:
            gpu = parse_gpu_override(f"1x{value}")[0]
        except GpuDiscoveryError as exc:
            raise HarvestConfigError(f"--gres-type {item!r}: {exc}") from None
        types[slurm_type] = gpu.type
        memory[gpu.type] = gpu.memory_bytes / 2**30
    return GresMapping(types, memory)


def check_settings(partitions: Sequence[str], gres: GresMapping, time_limit_s: int, cluster: ClusterConfig,
                   slurm_partitions: Sequence[Partition], nodes: Sequence[SlurmNode]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the configuration against what Slurm has (module docstring)."""
    problems: list[str] = []
    warnings: list[str] = []
    known: Mapping[str, Partition] = {p.name: p for p in slurm_partitions}
    if not partitions:
        problems.append("give at least one --partition")
    for name in partitions:
        part = known.get(name)
        if part is None:
            problems.append(f"unknown partition {name!r}; Slurm has: {', '.join(sorted(known)) or 'none'}")
            continue
        if not part.up:
            warnings.append(f"partition {name!r} is not up; nothing is harvested there until it is")
        if part.max_time_s and time_limit_s > part.max_time_s:
            problems.append(f"--time {time_limit_s // 60} min exceeds partition {name!r}'s MaxTime "
                            f"({part.max_time_s // 60} min)")
    unmapped: dict[str, set[str]] = {}
    untyped: set[str] = set()
    seen_types: set[str] = set()
    for node in nodes:
        if not set(node.partitions) & set(partitions):
            continue
        for slurm_type in node.gpus_total:
            if not slurm_type:
                untyped.add(node.name)
                continue
            seen_types.add(slurm_type)
            if slurm_type not in gres.types:
                unmapped.setdefault(slurm_type, set()).add(node.name)
    for slurm_type, names in sorted(unmapped.items()):
        where = ", ".join(sorted(names)[:5]) + (" …" if len(names) > 5 else "")
        problems.append(f"GRES type {slurm_type!r} (on {where}) has no --gres-type mapping; add "
                        f"--gres-type {slurm_type}=GPU_TYPE (e.g. A100-80GB), or {slurm_type}= to leave it")
    if untyped:
        warnings.append(f"{len(untyped)} node(s) have GPUs without a GRES type ({', '.join(sorted(untyped)[:5])}); "
                        "they are not harvested (a job cannot ask for their type)")
    for slurm_type, gpu_type in sorted(gres.types.items()):
        if not gpu_type:
            continue
        if gpu_type not in cluster.gpu_types:
            problems.append(f"GPU type {gpu_type!r} (--gres-type {slurm_type}={gpu_type}) has no price in the "
                            "cluster file's gpu_types")
        if slurm_type not in seen_types:
            warnings.append(f"--gres-type {slurm_type}: no node of {', '.join(partitions)} has that GRES type now")
    if time_limit_s <= cluster.horizon_s:
        problems.append(f"--time {time_limit_s // 60} min is within the planner's horizon ({cluster.horizon_s:g}s, "
                        "cluster file horizon_s): the planner would place nothing on such a job")
    return problems, warnings
