"""Slurm serve-job lifecycle numbers, on a real private Slurm and a real etcd.

Needs what the Slurm tests need: root, ``slurm-wlm`` and ``munge`` (see tests/slurmcluster.py).
Starts etcd, a private munged + slurmctld + slurmd, a `ctl gateway` and a backup agent for the
model outside Slurm, then runs the scenario of tests/slurm/lifecycle.py N times:

    sbatch ops/slurm/serve.sbatch ─▶ routable through the gateway        (sbatch → routable)
    steady streaming load (4 clients) ─▶ scancel ─▶ node + instance records gone
                                                    (end signal → records gone, failed requests)

and, on a second etcd of its own, N times: an agent serving in serve mode with lease TTL 3 s;
etcd is SIGKILLed, stays down longer than the TTL, and starts again on the same data dir and
port; we time from etcd answering /health again to the agent's instance record being back
(same instance id, READY).

Prints median and max per number, and writes them as JSON with ``--json-out``.

    sudo .venv/bin/python bench/slurm_lifecycle.py --rounds 3 --json-out /tmp/slurm_lifecycle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys, decode
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store import EtcdConfig, EtcdStore, KeyValue, StoreError
from controlplane.tenancy import DEFAULT_TENANT
from tests.cluster import start_agent, start_gateway, stop_all
from tests.slurm.lifecycle import MODEL, LifecycleResult, run_lifecycle
from tests.slurmcluster import SlurmCluster, SlurmUnavailable

ETCD_OUTAGE_TTL_S = 3
ETCD_DOWN_S = 5.0          # longer than the TTL: the lease is gone when etcd returns
POLL_S = 0.01


def summarize(values: list[float]) -> dict[str, float]:
    """Median and max, rounded to milliseconds."""
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


# -- the Slurm serve-job rounds ---------------------------------------------------------------------


async def slurm_rounds(rounds: int, tmp: Path) -> list[LifecycleResult]:
    """N lifecycle rounds on one private Slurm, one etcd, one gateway and one backup agent."""
    etcd = EtcdProcess.in_temp_dir().start()
    cluster = SlurmCluster.in_temp_dir()
    procs = []
    store: EtcdStore | None = None
    try:
        cluster.start()
        prefix = f"/bench-slurm-{uuid.uuid4().hex[:6]}"
        gw, url = start_gateway(etcd.endpoint, prefix, tmp, "--no-auth")
        backup, _ = start_agent(etcd.endpoint, prefix, tmp, MODEL, "backup", "--sim-option", "tokens_per_s=200")
        procs = [backup, gw]
        store = await EtcdStore(EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix)).connect()
        results = []
        for n in range(rounds):
            result = await run_lifecycle(cluster, store, url, etcd.endpoint, tmp / f"round-{n}", end_by="scancel")
            print(f"  round {n + 1}: sbatch→routable {result.sbatch_to_routable_s:.2f}s, scancel→gone "
                  f"{result.end_signal_to_records_gone_s:.2f}s, requests {result.requests_ok} ok / "
                  f"{result.requests_failed} failed, job {result.job_state}", flush=True)
            results.append(result)
        return results
    finally:
        if store is not None:
            await store.close()
        stop_all(procs)
        cluster.stop()
        etcd.stop()


# -- the etcd restart rounds ------------------------------------------------------------------------


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return b'"true"' in resp.read()
    except (urllib.error.URLError, OSError):
        return False


async def _ready_instance_kv(store: EtcdStore, timeout: float) -> KeyValue:
    """The (only) READY instance record, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kvs, _ = await store.list_prefix(Keys(store.prefix).tenant(DEFAULT_TENANT) + "instances/")
        for kv in kvs:
            if decode(InstanceRecord, kv).state == InstanceState.READY:
                return kv
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"no READY instance within {timeout}s")


async def _get(store: EtcdStore, key: str) -> tuple[bool, KeyValue | None]:
    """(answered, kv): etcd may still refuse for a moment after /health turns true."""
    try:
        return True, await store.get(key)
    except StoreError:
        return False, None


async def reregistration_round(etcd: EtcdProcess, config: EtcdConfig, agent_alive: Callable[[], bool]) -> EtcdRound:
    """Kill etcd for longer than the TTL, start it on the same data dir and port, time the agent.

    The bench's own client is opened fresh once etcd is healthy again: a gRPC channel that saw the
    outage sits in its reconnect backoff and would add seconds of its own to the measurement.
    """
    async with EtcdStore(config) as before_store:
        before = await _ready_instance_kv(before_store, 30)
    etcd.kill()
    await asyncio.sleep(ETCD_DOWN_S)
    if not agent_alive():
        raise RuntimeError("the agent exited while etcd was down")
    etcd.start(wait=False)
    while not _healthy(etcd.client_port):
        await asyncio.sleep(POLL_S)
    back = time.monotonic()
    async with EtcdStore(config) as store:
        # etcd keeps leases across a restart (and extends them), so the record is still there on the
        # agent's *old* lease: re-registered means "written again on the lease the agent now holds".
        absent_since: float | None = None
        gap = 0.0
        while True:
            answered, kv = await _get(store, before.key)
            now = time.monotonic()
            if answered and kv is None and absent_since is None:
                absent_since = now
            if kv is not None and absent_since is not None:
                gap += now - absent_since
                absent_since = None
            if kv is not None and kv.lease not in (0, before.lease):
                rec = decode(InstanceRecord, kv)
                if rec.state == InstanceState.READY:
                    break
            if now - back > 60:
                raise TimeoutError("the instance was not re-registered within 60 s of etcd coming back")
            await asyncio.sleep(POLL_S)
        took = now - back
        old = decode(InstanceRecord, before)
        if rec.instance_id != old.instance_id or rec.endpoint != old.endpoint:
            raise RuntimeError(f"a different instance came back: {rec.instance_id} at {rec.endpoint}")
        await asyncio.sleep(ETCD_OUTAGE_TTL_S + 2.0)  # the old lease has expired by now: the record must stay
        _, kv = await _get(store, before.key)
    return EtcdRound(took, round(gap, 3), kv is not None)


@dataclass(frozen=True)
class EtcdRound:
    """One etcd restart: etcd healthy → record on the agent's new lease; time the record was absent."""

    reregistered_s: float
    record_absent_s: float
    survived_old_lease_expiry: bool


async def etcd_restart_rounds(rounds: int, tmp: Path) -> list[EtcdRound]:
    """N etcd restarts under one serve-mode agent (lease TTL 3 s) on an etcd of their own."""
    etcd = EtcdProcess.in_temp_dir().start()
    prefix = f"/bench-outage-{uuid.uuid4().hex[:6]}"
    config = EtcdConfig(endpoints=(etcd.endpoint,), prefix=prefix, timeout_s=1.0)
    agent, _ = start_agent(etcd.endpoint, prefix, tmp, "outage-model", "outage-node",
                           "--lease-ttl", str(ETCD_OUTAGE_TTL_S))
    out = []
    try:
        for n in range(rounds):
            r = await reregistration_round(etcd, config, lambda: agent.poll() is None)
            print(f"  round {n + 1}: etcd back → re-registered {r.reregistered_s:.2f}s, record absent "
                  f"{r.record_absent_s:.2f}s, still there after the old lease expired: "
                  f"{r.survived_old_lease_expiry}", flush=True)
            out.append(r)
        return out
    finally:
        stop_all([agent])
        etcd.stop()


# -- main -------------------------------------------------------------------------------------------


async def run(rounds: int, parts: set[str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-slurm-"))
    report: dict[str, Any] = {"rounds": rounds, "command": " ".join(["python", *sys.argv])}
    if "slurm" in parts:
        print(f"Slurm serve job, {rounds} rounds (scancel under load):", flush=True)
        results = await slurm_rounds(rounds, tmp)
        report["slurm"] = {
            "sbatch_to_routable_s": summarize([r.sbatch_to_routable_s for r in results]),
            "scancel_to_records_gone_s": summarize([r.end_signal_to_records_gone_s for r in results]),
            "requests_failed": sum(r.requests_failed for r in results),
            "requests_total": sum(r.requests_ok + r.requests_failed for r in results),
            "requests_served_by_slurm_instance": int(sum(r.requests_to_slurm_instance for r in results)),
            "runs": [asdict(r) for r in results],
        }
    if "etcd" in parts:
        print(f"etcd restart (agent lease TTL {ETCD_OUTAGE_TTL_S}s, down {ETCD_DOWN_S:.0f}s), {rounds} rounds:",
              flush=True)
        restarts = await etcd_restart_rounds(rounds, tmp)
        report["etcd_restart"] = {
            "etcd_back_to_reregistered_s": summarize([r.reregistered_s for r in restarts]),
            "record_absent_s": summarize([r.record_absent_s for r in restarts]),
            "survived_old_lease_expiry": all(r.survived_old_lease_expiry for r in restarts),
            "lease_ttl_s": ETCD_OUTAGE_TTL_S, "etcd_down_s": ETCD_DOWN_S, "runs": [asdict(r) for r in restarts]}
    return report


def print_report(report: dict[str, Any]) -> None:
    print()
    print(f"{'measure':<44}{'median':>10}{'max':>10}")
    slurm = report.get("slurm")
    if slurm:
        for name, key in (("sbatch → routable through the gateway (s)", "sbatch_to_routable_s"),
                          ("scancel → node + instance records gone (s)", "scancel_to_records_gone_s")):
            print(f"{name:<44}{slurm[key]['median']:>10.3f}{slurm[key]['max']:>10.3f}")
        print(f"{'requests failed during drain':<44}{slurm['requests_failed']:>10} of {slurm['requests_total']} "
              f"({slurm['requests_served_by_slurm_instance']} served by the job's instance before the end)")
    restart = report.get("etcd_restart")
    if restart:
        for name, key in (("etcd back → instance re-registered (s)", "etcd_back_to_reregistered_s"),
                          ("instance record absent meanwhile (s)", "record_absent_s")):
            v = restart[key]
            print(f"{name:<44}{v['median']:>10.3f}{v['max']:>10.3f}")
        print(f"{'record kept after the old lease expired':<44}{restart['survived_old_lease_expiry']!s:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (default 3)")
    parser.add_argument("--parts", default="slurm,etcd", help="comma-separated: slurm, etcd (default both)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.rounds < 1 or not parts or parts - {"slurm", "etcd"}:
        parser.error("--rounds must be >= 1 and --parts a subset of slurm,etcd")
    try:
        report = asyncio.run(run(args.rounds, parts))
    except SlurmUnavailable as exc:
        print(f"error: no Slurm test cluster here: {exc} (run with --parts etcd to skip Slurm)", file=sys.stderr)
        raise SystemExit(2) from None
    print_report(report)
    if report.get("slurm", {}).get("requests_failed"):
        print("error: requests failed during the drain", file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    raise SystemExit(1 if report.get("slurm", {}).get("requests_failed") else 0)


if __name__ == "__main__":
    main()
