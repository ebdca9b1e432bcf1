"""Facts about the Slurm job the agent runs in: id, partition, node list, user and end time.

Identity comes from the job's environment (``SLURM_JOB_ID`` …); the end time from
``squeue -h -j $SLURM_JOB_ID -o %e``, falling back to ``scontrol show job -o $SLURM_JOB_ID``
(which also fills fields the environment lacks, and gives StartTime + TimeLimit when EndTime
is missing).

Slurm formats times in the local time zone *of the command printing them*, without a zone
("2026-11-22T17:52:55"), in a shape a user can change with ``SLURM_TIME_FORMAT``. So the
commands run with ``TZ=UTC`` and ``SLURM_TIME_FORMAT=standard`` and their output is read as
UTC: the result does not depend on this host's zone or the user's settings. "N/A", "Unknown",
"NONE" and "UNLIMITED" mean no end time (0).

Every command runs with a timeout; failures are logged and never fatal — the agent then relies
on the pre-end signal alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo

import structlog

from controlplane.pb import SlurmJob

log = structlog.get_logger(__name__)

SLURM_CMD_TIMEOUT_S = 10.0
# Pinned for every Slurm command we run, so their timestamps are ISO and UTC (see module doc).
SLURM_CMD_ENV = {"TZ": "UTC", "SLURM_TIME_FORMAT": "standard"}
_NO_TIME = {"", "N/A", "UNKNOWN", "NONE", "INVALID", "UNLIMITED", "INFINITE", "NOT_SET", "PARTITION_LIMIT"}
_SLURM_TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S")
# TimeLimit: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S".
_DURATION = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


@dataclass(frozen=True)
class SlurmJobInfo:
    """The job the agent runs in; ``end_time_unix`` is 0 when unknown or unlimited."""

    job_id: str
    partition: str
    node_list: str
    end_time_unix: int
    user: str

    def to_pb(self) -> SlurmJob:
        """The NodeRecord form."""
        return SlurmJob(job_id=self.job_id, partition=self.partition, node_list=self.node_list,
                        end_time_unix=self.end_time_unix, user=self.user)


# ---------------------------------------------------------------------------------------------
# Pure parsing


def parse_slurm_time(text: str, tz: tzinfo | None = UTC) -> int:
    """Unix seconds of a Slurm timestamp read in ``tz`` (None: this host's zone); 0 when none.

    Raises ValueError for text that is neither a timestamp nor one of Slurm's "no time" words.
    """
    value = text.strip()
    if value.upper() in _NO_TIME:
        return 0
    for fmt in _SLURM_TIME_FORMATS:
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return int(parsed.replace(tzinfo=tz).timestamp()) if tz is not None else int(parsed.timestamp())
    raise ValueError(f"not a Slurm time: {text!r}")


def parse_slurm_duration(text: str) -> int:
    """Seconds of a Slurm time limit ("30", "1:30:00", "2-12", "1-00:00:00"); 0 for UNLIMITED/N/A.

    Follows sbatch ``--time``: one number is minutes, two are minutes:seconds, three are
    hours:minutes:seconds; after ``days-`` they are hours[:minutes[:seconds]].
    Raises ValueError for anything else.
    """
    value = text.strip()
    if value.upper() in _NO_TIME:
        return 0
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    parts = [int(p) for p in (m["a"], m["b"], m["c"]) if p is not None]
    if m["days"] is not None:
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return ((int(m["days"]) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def parse_squeue_end_time(output: str, tz: tzinfo | None = UTC) -> int | None:
    """End time from ``squeue -h -j ID -o %e`` output; None when the output has no usable line.

    0 (a known "no end time": N/A, UNLIMITED …) is distinct from None (no answer at all).
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        return parse_slurm_time(lines[0], tz)
    except ValueError:
        log.warning("squeue_end_time_unreadable", line=lines[0])
        return None


def parse_scontrol_job(output: str) -> dict[str, str]:
    """``Key=Value`` fields of ``scontrol show job -o`` (first occurrence of a key wins).

    Values are split on whitespace, so a value with spaces (a Command or WorkDir path) is cut
    short; none of the fields read here can contain one.
    """
    fields: dict[str, str] = {}
    for token in output.split():
        key, sep, value = token.partition("=")
        if sep and key and key not in fields:
            fields[key] = value
    return fields


def scontrol_end_time(fields: Mapping[str, str], tz: tzinfo | None = UTC) -> int:
    """EndTime from scontrol fields, else StartTime + TimeLimit; 0 when neither is known."""
    try:
        end = parse_slurm_time(fields.get("EndTime", ""), tz)
    except ValueError:
        end = 0
    if end:
        return end
    try:
        start = parse_slurm_time(fields.get("StartTime", ""), tz)
        limit = parse_slurm_duration(fields.get("TimeLimit", ""))
    except ValueError:
        return 0
    return start + limit if start and limit else 0


def job_from_env(env: Mapping[str, str]) -> SlurmJobInfo | None:
    """Identity from the job's environment (end time left 0); None outside Slurm."""
    job_id = env.get("SLURM_JOB_ID", "").strip() or env.get("SLURM_JOBID", "").strip()
    if not job_id:
        return None
    return SlurmJobInfo(
        job_id=job_id,
        partition=env.get("SLURM_JOB_PARTITION", ""),
        node_list=env.get("SLURM_JOB_NODELIST", "") or env.get("SLURM_NODELIST", ""),
        end_time_unix=0,
        user=env.get("SLURM_JOB_USER", "") or env.get("USER", ""),
    )


def merge_scontrol(job: SlurmJobInfo, fields: Mapping[str, str], tz: tzinfo | None = UTC) -> SlurmJobInfo:
    """Fill ``job``'s empty fields (and a missing end time) from parsed scontrol fields."""
    end = job.end_time_unix or scontrol_end_time(fields, tz)
    user = job.user or re.sub(r"\(\d+\)$", "", fields.get("UserId", ""))
    return replace(job, partition=job.partition or fields.get("Partition", ""),
                   node_list=job.node_list or fields.get("NodeList", ""), end_time_unix=end, user=user)


# ---------------------------------------------------------------------------------------------
# I/O shell


def run_slurm_command(argv: list[str], env: Mapping[str, str], timeout_s: float = SLURM_CMD_TIMEOUT_S) -> str | None:
    """stdout of a Slurm command found on ``env['PATH']`` (times pinned to UTC), or None on any failure."""
    binary = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if binary is None:
        log.warning("slurm_command_missing", command=argv[0])
        return None
    try:
        out = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=timeout_s,
                             env={**env, **SLURM_CMD_ENV}, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("slurm_command_failed", command=argv[0], error=str(exc))
        return None
    if out.returncode != 0:
        log.warning("slurm_command_failed", command=argv[0], rc=out.returncode, stderr=out.stderr.strip()[-300:])
        return None
    return out.stdout


def query_end_time(job_id: str, env: Mapping[str, str] = os.environ,
                   timeout_s: float = SLURM_CMD_TIMEOUT_S) -> int | None:
    """The job's end time via squeue (None when squeue is missing, fails, or prints nonsense)."""
    out = run_slurm_command(["squeue", "-h", "-j", job_id, "-o", "%e"], env, timeout_s)
    return parse_squeue_end_time(out) if out is not None else None


def detect_slurm_job(env: Mapping[str, str] = os.environ,
                     timeout_s: float = SLURM_CMD_TIMEOUT_S) -> SlurmJobInfo | None:
    """The Slurm job this process runs in, or None when ``SLURM_JOB_ID`` is unset."""
    job = job_from_env(env)
    if job is None:
        return None
    end = query_end_time(job.job_id, env, timeout_s)
    if end:
        job = replace(job, end_time_unix=end)
    if not end or not (job.partition and job.node_list and job.user):
        out = run_slurm_command(["scontrol", "show", "job", "-o", job.job_id], env, timeout_s)
        if out is not None:
            job = merge_scontrol(job, parse_scontrol_job(out))
    log.info("slurm_job_detected", job_id=job.job_id, partition=job.partition, node_list=job.node_list,
             end_time_unix=job.end_time_unix)
    return job
