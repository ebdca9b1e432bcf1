"""GPU discovery for the agent: an override, else NVML, else `nvidia-smi`, filtered by visibility.

Order (first that answers wins):

1. ``--gpus`` override such as ``2xA100-80GB``, ``1xRTX4090``, ``A100-80GB,A100-80GB``,
   ``4xGH200`` or ``1xMYCARD:24GB`` (for CPU-only test hosts, or to name cards NVML gets wrong);
2. NVML through ``pynvml`` (nvidia-ml-py);
3. ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``.

The devices found are then restricted to what this process may use: ``CUDA_VISIBLE_DEVICES``
(indices or UUIDs, in that order), else Slurm's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS`` /
``GPU_DEVICE_ORDINAL``. ``GpuInfo.index`` is the device index as NVML numbers it in this
environment, i.e. the value an engine child needs in *its* ``CUDA_VISIBLE_DEVICES`` (a child's
variable replaces the parent's, it does not nest).

Parsing and name normalisation are pure functions, tested directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from controlplane.pb import Gpu

log = structlog.get_logger(__name__)

GIB = 1024**3
NVIDIA_SMI_TIMEOUT_S = 10.0
NVIDIA_SMI_QUERY = ("--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits")

# Memory (GiB) of the normalised types an override may name without an explicit size.
KNOWN_GPU_MEMORY_GIB: dict[str, int] = {
    "A100-40GB": 40, "A100-80GB": 80, "A800-80GB": 80, "A10": 24, "A10G": 24, "A30": 24, "A40": 48,
    "A6000": 48, "A5000": 24, "A4000": 16, "L4": 24, "L40": 48, "L40S": 48, "T4": 16,
    "V100-16GB": 16, "V100-32GB": 32, "H100-80GB": 80, "H100-NVL": 94, "H800-80GB": 80,
    "H200": 141, "GH200": 96, "B200": 180, "RTX3090": 24, "RTX3090TI": 24, "RTX4080": 16,
    "RTX4090": 24, "RTX5090": 32, "RTX6000-ADA": 48, "RTX8000": 48, "TITANRTX": 24,
}
# Families sold with several memory sizes: the size becomes part of the type name.
_SIZED_FAMILIES = ("A100", "A800", "H100", "H800", "V100")
_STANDARD_SIZES_GIB = (16, 24, 32, 40, 48, 80, 94, 96, 141, 144, 180, 192)
_DROP_TOKENS = {"NVIDIA", "GEFORCE", "TESLA", "QUADRO", "SXM", "SXM2", "SXM3", "SXM4", "SXM5", "PCIE",
                "HBM2", "HBM2E", "HBM3", "HBM3E", "GENERATION", "MIG"}
_OVERRIDE_ITEM = re.compile(r"^(?:(?P<count>\d+)\s*[xX]\s*)?(?P<type>[A-Za-z0-9][A-Za-z0-9_.\-]*?)"
                            r"(?::(?P<mem>\d+(?:\.\d+)?)\s*(?P<unit>GB|GIB|G|MB|MIB|M)?)?$", re.IGNORECASE)
_MEM_IN_NAME = re.compile(r"-(\d+)GB$", re.IGNORECASE)
MAX_OVERRIDE_GPUS = 64


class GpuDiscoveryError(RuntimeError):
    """No usable GPU description: nothing detected and no override, or a malformed override."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU this agent may hand to engines."""

    index: int            # value for an engine's CUDA_VISIBLE_DEVICES
    type: str             # normalised type, e.g. "A100-80GB"
    memory_bytes: int
    uuid: str = ""

    def to_pb(self) -> Gpu:
        """The NodeRecord form."""
        return Gpu(index=self.index, type=self.type, memory_bytes=self.memory_bytes, uuid=self.uuid)


# ---------------------------------------------------------------------------------------------
# Pure parsing


def parse_gpu_override(text: str, visible: Sequence[str] = ()) -> list[GpuInfo]:
    """Parse ``--gpus`` (``2xA100-80GB``, ``A100-80GB,A100-80GB``, ``1xFOO:24GB``) into GpuInfos.

    Indices are 0..n-1, or the visible device indices when exactly that many numeric ones are
    given (a real GPU node whose cards are only renamed).
    """
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in items):
        raise GpuDiscoveryError(f"--gpus {text!r}: empty item; expected e.g. 2xA100-80GB or A100-80GB,L40S")
    types: list[tuple[str, int]] = []
    for item in items:
        m = _OVERRIDE_ITEM.match(item)
        if m is None:
            raise GpuDiscoveryError(
                f"--gpus item {item!r} is not COUNTxTYPE[:MEMORY], e.g. 2xA100-80GB or 1xMYGPU:24GB")
        count = int(m["count"]) if m["count"] is not None else 1
        if count < 1 or count > MAX_OVERRIDE_GPUS:
            raise GpuDiscoveryError(f"--gpus item {item!r}: count must be 1..{MAX_OVERRIDE_GPUS}")
        gpu_type = m["type"].upper()
        memory = _override_memory(item, gpu_type, m["mem"], m["unit"])
        types.extend([(gpu_type, memory)] * count)
    if len(types) > MAX_OVERRIDE_GPUS:
        raise GpuDiscoveryError(f"--gpus {text!r}: at most {MAX_OVERRIDE_GPUS} GPUs")
    indices = list(range(len(types)))
    if len(visible) == len(types) and all(v.isdigit() for v in visible):
        indices = [int(v) for v in visible]
    return [GpuInfo(index=i, type=t, memory_bytes=mem) for i, (t, mem) in zip(indices, types, strict=True)]


def _override_memory(item: str, gpu_type: str, mem: str | None, unit: str | None) -> int:
    if mem is not None:
        scale = 1024**2 if (unit or "GB").upper() in ("MB", "MIB", "M") else GIB
        value = int(float(mem) * scale)
        if value <= 0:
            raise GpuDiscoveryError(f"--gpus item {item!r}: memory must be positive")
        return value
    if gpu_type in KNOWN_GPU_MEMORY_GIB:
        return KNOWN_GPU_MEMORY_GIB[gpu_type] * GIB
    sized = _MEM_IN_NAME.search(gpu_type)
    if sized is not None and int(sized.group(1)) > 0:
        return int(sized.group(1)) * GIB
    raise GpuDiscoveryError(
        f"--gpus item {item!r}: unknown GPU type {gpu_type!r} without a memory size; "
        f"write it as {gpu_type}:24GB (or {gpu_type}-24GB). Known types: {', '.join(sorted(KNOWN_GPU_MEMORY_GIB))}"
    )


def _snap_gib(memory_bytes: int) -> int:
    gib = memory_bytes / GIB
    return min(_STANDARD_SIZES_GIB, key=lambda size: abs(size - gib))


def normalize_gpu_name(name: str, memory_bytes: int = 0) -> str:
    """Short type names: "NVIDIA A100-SXM4-80GB" → "A100-80GB", "NVIDIA GeForce RTX 4090" → "RTX4090".

    Memory-variant families (A100, H100, V100, …) get their size from the name, else from the
    reported memory snapped to a standard size. Unknown names are kept, uppercased, dashes for spaces.
    """
    raw = name.strip()
    upper = raw.upper()
    if "GH200" in upper:
        return "GH200"
    tokens = [t for t in re.split(r"[\s\-_]+", upper) if t and t not in _DROP_TOKENS]
    mem_gb = next((int(t[:-2]) for t in tokens if re.fullmatch(r"\d+GB", t)), 0)
    tokens = [t for t in tokens if not re.fullmatch(r"\d+GB", t)]
    if not tokens:
        return upper or "UNKNOWN"
    if tokens[0] == "RTX" and len(tokens) > 1:
        if tokens[1].isdigit():  # "RTX 4090", "RTX 6000 ADA"
            rest = "".join(tokens[2:])
            rest = "" if rest in ("", "D") else rest
            return f"RTX{tokens[1]}" + (f"-{rest}" if rest == "ADA" else rest)
        return "-".join(tokens[1:])  # "RTX A6000" → "A6000"
    base = tokens[0]
    if base in _SIZED_FAMILIES:
        if "NVL" in tokens[1:]:
            return f"{base}-NVL"
        if not mem_gb and memory_bytes > 0:
            mem_gb = _snap_gib(memory_bytes)
        return f"{base}-{mem_gb}GB" if mem_gb else base
    if base == "TITAN":
        return "TITAN" + "".join(tokens[1:])
    return "-".join(tokens)


@dataclass(frozen=True)
class RawGpu:
    """A device as NVML or nvidia-smi reports it, before normalisation and filtering."""

    index: int
    name: str
    memory_bytes: int
    uuid: str


def parse_nvidia_smi_csv(text: str) -> list[RawGpu]:
    """Parse ``index, name, memory.total (MiB), uuid`` lines; skips lines it cannot read (logged)."""
    gpus: list[RawGpu] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            log.warning("nvidia_smi_line_skipped", line=line)
            continue
        # The name never contains a comma in practice, but be safe: index first, uuid and memory last.
        index, uuid, mem = int(fields[0]), fields[-1], fields[-2]
        name = ",".join(fields[1:-2]).strip()
        try:
            memory = int(float(mem) * 1024**2)
        except ValueError:  # "[N/A]" on some boards
            memory = 0
        gpus.append(RawGpu(index=index, name=name, memory_bytes=memory, uuid=uuid))
    return gpus


def visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """The device list this process is limited to, or None when nothing restricts it.

    ``CUDA_VISIBLE_DEVICES`` wins (indices or UUIDs; empty = no GPU), then Slurm's
    ``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``, ``GPU_DEVICE_ORDINAL``.
    """
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL"):
        value = env.get(var)
        if value is None:
            continue
        value = value.strip()
        if value in ("NoDevFiles", ""):
            return []
        return [v.strip() for v in value.split(",") if v.strip()]
    return None


def select_visible(raw: Sequence[RawGpu], visible: Sequence[str] | None) -> list[GpuInfo]:
    """Restrict ``raw`` to ``visible`` (in that order) and normalise names.

    Items are indices or (prefixes of) UUIDs, as CUDA accepts them. Slurm's device cgroup can
    renumber what NVML sees from 0 while ``SLURM_JOB_GPUS`` keeps the node's numbering (job
    GPUs "2,3" appear as 0 and 1): so when the items are all indices, not all of them exist,
    and there are exactly as many as devices found, the view is taken as already restricted
    and every device is kept.
    """
    def info(g: RawGpu) -> GpuInfo:
        return GpuInfo(index=g.index, type=normalize_gpu_name(g.name, g.memory_bytes),
                       memory_bytes=g.memory_bytes, uuid=g.uuid)

    if visible is None:
        return [info(g) for g in raw]
    by_index = {g.index: g for g in raw}
    numeric = all(item.isdigit() for item in visible)
    if numeric and visible and len(visible) == len(raw) and not all(int(v) in by_index for v in visible):
        return [info(g) for g in raw]
    chosen: list[RawGpu] = []
    for item in visible:
        if item.isdigit():
            match = by_index.get(int(item))
        else:
            match = next((g for g in raw if g.uuid and g.uuid.startswith(item)), None)
        if match is None:
            log.warning("visible_device_not_found", device=item, found=[g.index for g in raw])
            continue
        if match not in chosen:
            chosen.append(match)
    return [info(g) for g in chosen]


# ---------------------------------------------------------------------------------------------
# I/O shells


def query_nvml() -> list[RawGpu] | None:
    """Devices from NVML, or None when NVML is not available here."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("nvml_unavailable", error=str(exc))
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(RawGpu(index=i, name=_text(name), memory_bytes=int(mem), uuid=_text(uuid)))
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("nvml_query_failed", error=str(exc))
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def query_nvidia_smi(env: Mapping[str, str], timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> list[RawGpu] | None:
    """Devices from ``nvidia-smi`` found on ``env['PATH']``, or None when absent or failing."""
    binary = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if binary is None:
        return None
    # nvidia-smi itself ignores CUDA_VISIBLE_DEVICES; we filter afterwards.
    try:
        out = subprocess.run([binary, *NVIDIA_SMI_QUERY], capture_output=True, text=True,
                             timeout=timeout_s, env=dict(env), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia_smi_failed", error=str(exc))
        return None
    if out.returncode != 0:
        log.warning("nvidia_smi_failed", rc=out.returncode, stderr=out.stderr.strip()[-500:])
        return None
    return parse_nvidia_smi_csv(out.stdout)


def discover_gpus(override: str | None, env: Mapping[str, str] = os.environ, *,
                  use_nvml: bool = True, smi_timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> list[GpuInfo]:
    """The GPUs this agent may use (see the module docstring for the order).

    Raises GpuDiscoveryError when none are found and no override is given, or the override is bad.
    """
    visible = visible_devices(env)
    if override:
        return parse_gpu_override(override, visible or ())
    raw: list[RawGpu] | None = query_nvml() if use_nvml else None
    source = "nvml"
    if not raw:
        raw, source = query_nvidia_smi(env, smi_timeout_s), "nvidia-smi"
    gpus = select_visible(raw or [], visible)
    if not gpus:
        restricted = f" (visible devices: {','.join(visible) or 'none'})" if visible is not None else ""
        raise GpuDiscoveryError(
            f"no GPU found via NVML or nvidia-smi{restricted}. On a host without GPUs, say what to "
            "advertise with --gpus, e.g. --gpus 2xA100-80GB, --gpus 1xRTX4090 or --gpus 1xSIM-24GB"
        )
    log.info("gpus_discovered", source=source, gpus=[f"{g.index}:{g.type}" for g in gpus])
    return gpus
