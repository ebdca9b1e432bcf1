"""Tables and JSON for `ctl harvest plan` and `ctl harvest status` (pure formatting)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from controlplane.cli.common import OutputFormat
from controlplane.cli.output import age, print_json, print_table
from controlplane.harvest.model import (
    ACTIVE,
    STATE_NAMES,
    HarvestPlan,
    budget_of,
    reserved_hours,
    run_hours,
    total_hours,
)
from controlplane.pb import HarvestJob, HarvestStatus


def plan_data(plan: HarvestPlan) -> dict[str, Any]:
    """The plan as `-o json` prints it."""
    return {
        "changes": plan.changes,
        "submit": [{"partition": s.partition, "gres": f"gpu:{s.slurm_type}:{s.gpus}", "gpu_type": s.gpu_type,
                    "gpus": s.gpus, "models": list(s.models), "price_per_gpu_hour": s.price_per_gpu_hour,
                    "reason": s.reason} for s in plan.submits],
        "release": [{"job_id": d.job_id, "node_id": d.node_id, "reason": d.reason} for d in plan.drains],
        "cancel": [{"job_id": c.job_id, "reason": c.reason} for c in plan.cancels],
        "budget": _budget_dict(plan.budget.limit, plan.budget.used, plan.budget.reserved),
        "active_jobs": plan.active_jobs,
        "unmet_rps": {m: round(v, 4) for m, v in sorted(plan.unmet_rps.items())},
        "notes": list(plan.notes),
    }


def render_plan(plan: HarvestPlan, output: OutputFormat) -> None:
    """Print a harvest plan."""
    if output is OutputFormat.json:
        print_json(plan_data(plan))
        return
    rows: list[tuple[Any, ...]] = [("submit", "-", s.partition, f"gpu:{s.slurm_type}:{s.gpus}", ",".join(s.models),
                                    s.reason) for s in plan.submits]
    rows += [("release", d.job_id, "-", "-", "-", d.reason) for d in plan.drains]
    rows += [("cancel", c.job_id, "-", "-", "-", c.reason) for c in plan.cancels]
    print_table(["action", "job", "partition", "gres", "models", "why"], rows, title="Harvest plan")
    b = plan.budget
    limit = f"{b.limit:g}" if b.limit > 0 else "unlimited"
    print(f"GPU-hours (24 h): {b.used:.2f} used + {b.reserved:.2f} reserved of {limit} | "
          f"{plan.active_jobs} active job(s)")
    for model, rps in sorted(plan.unmet_rps.items()):
        print(f"unmet: {model} {rps:.2f} req/s")
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)


def _budget_dict(limit: float, used: float, reserved: float) -> dict[str, Any]:
    return {"limit_gpu_hours_per_day": limit or None, "used_gpu_hours": round(used, 4),
            "reserved_gpu_hours": round(reserved, 4),
            "left_gpu_hours": round(max(0.0, limit - used - reserved), 4) if limit > 0 else None}


def status_data(jobs: Mapping[str, HarvestJob], status: HarvestStatus | None, now: float) -> dict[str, Any]:
    """Jobs, budget and the leader's notes, as `ctl harvest status -o json` prints them."""
    now_ms = int(now * 1000)
    limit = status.budget_gpu_hours_per_day if status is not None else 0.0
    budget = budget_of(jobs, limit, now_ms)
    rows = []
    for job_id, j in sorted(jobs.items(), key=lambda kv: -kv[1].submitted_unix_ms):
        rows.append({
            "job_id": job_id, "state": STATE_NAMES.get(j.state, "unknown"), "slurm_state": j.slurm_state,
            "partition": j.partition, "gres": f"gpu:{j.slurm_gres_type}:{j.gpu_count}", "gpu_type": j.gpu_type,
            "gpus": j.gpu_count, "models": list(j.models), "node_id": j.node_id,
            "submitted_unix_ms": j.submitted_unix_ms, "started_unix_ms": j.started_unix_ms,
            "ended_unix_ms": j.ended_unix_ms, "gpu_hours": round(total_hours(j, now_ms), 4),
            "gpu_hours_24h": round(run_hours(j, now_ms), 4), "reserved_gpu_hours": round(reserved_hours(j, now_ms), 4),
            "idle_since_unix_ms": j.idle_since_unix_ms, "reason": j.reason, "end_reason": j.end_reason,
        })
    return {
        "now_unix_ms": now_ms,
        "leader": status.leader if status is not None else None,
        "partitions": list(status.partitions) if status is not None else [],
        "budget": _budget_dict(limit, budget.used, budget.reserved),
        "max_jobs": status.max_jobs if status is not None else None,
        "active_jobs": sum(1 for j in jobs.values() if j.state in ACTIVE),
        "notes": list(status.notes) if status is not None else [],
        "unmet_rps": dict(status.unmet_rps) if status is not None else {},
        "last_error": status.last_error if status is not None else "",
        "jobs": rows,
    }


def render_status(data: Mapping[str, Any], output: OutputFormat) -> None:
    """Print `ctl harvest status`."""
    if output is OutputFormat.json:
        print_json(data)
        return
    now_ms = int(data["now_unix_ms"])
    print_table(["job", "state", "slurm", "partition", "gres", "models", "node", "gpu-h", "age", "why"],
                [(j["job_id"], j["state"], j["slurm_state"] or "-", j["partition"], j["gres"],
                  ",".join(j["models"]) or "-", j["node_id"] or "-", f"{j['gpu_hours']:.2f}",
                  age(j["submitted_unix_ms"], now_ms), j["end_reason"] or j["reason"]) for j in data["jobs"]],
                title="Harvested jobs")
    b = data["budget"]
    limit = f"{b['limit_gpu_hours_per_day']:g}" if b["limit_gpu_hours_per_day"] else "unlimited"
    leader = data["leader"] or "none (no `ctl harvest run` holds the leadership)"
    print(f"GPU-hours (24 h): {b['used_gpu_hours']:.2f} used + {b['reserved_gpu_hours']:.2f} reserved of {limit} | "
          f"{data['active_jobs']} active job(s), max {data['max_jobs'] if data['max_jobs'] is not None else '-'} | "
          f"leader: {leader}")
    for model, rps in sorted(data["unmet_rps"].items()):
        print(f"unmet: {model} {rps:.2f} req/s")
    for note in data["notes"]:
        print(f"note: {note}")
    if data["last_error"]:
        print(f"last round failed: {data['last_error']}")
