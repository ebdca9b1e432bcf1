"""etcd database size against its quota: the numbers, the warning, and a monitor for daemons.

etcd refuses every write once its backend database reaches ``--quota-backend-bytes`` (2 GiB by
default) and raises the NOSPACE alarm; agents could no longer register and the pool would stop.
The database file only shrinks by defragmentation, so a size near the quota needs an operator
(docs/etcd-layout.md, "Compaction, quota, defragmentation"). ``ctl status`` and every gateway
(log line, ``/readyz``, ``modelpool_gateway_etcd_db_*`` metrics) say so at ``WARN_FRACTION``.

The quota is not visible through etcd's client API: components are told it (``--etcd-quota``,
``MODELPOOL_ETCD_QUOTA``), defaulting to etcd's own default.
"""

from __future__ import annotations

import re
import time

import structlog

from controlplane.store import EtcdStore, MemberStatus, StoreAuthError

log = structlog.get_logger(__name__)

DEFAULT_QUOTA_BYTES = 2 * 1024**3      # etcd's default --quota-backend-bytes
WARN_FRACTION = 0.8
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_bytes(spec: str) -> int:
    """``2GiB``, ``512MiB``, ``8GB``, ``1000000`` as bytes; ValueError naming the accepted forms."""
    m = _SIZE.match(spec.lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a size: {spec!r} (use bytes, or a number with KiB/MiB/GiB or KB/MB/GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def space_warning(status: MemberStatus, quota_bytes: int, fraction: float = WARN_FRACTION) -> str | None:
    """What an operator must hear about etcd's space now, or None (pure)."""
    if "NOSPACE" in status.alarms:
        return ("etcd raised the NOSPACE alarm: it refuses writes until history is compacted, members are "
                "defragmented and the alarm is disarmed (docs/etcd-layout.md)")
    if quota_bytes > 0 and status.db_size_bytes >= fraction * quota_bytes:
        used = status.db_size_bytes / quota_bytes
        reclaim = status.db_size_bytes - status.db_size_in_use_bytes
        return (f"etcd database is {human(status.db_size_bytes)}, {used:.0%} of its {human(quota_bytes)} quota "
                f"({human(reclaim)} reclaimable by defragmentation); at the quota etcd refuses every write")
    return None


def human(n: float) -> str:
    """Bytes as a short IEC string (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class SpaceMonitor:
    """The last database status and warning; ``step`` is a periodic loop step (gateway)."""

    def __init__(self, store: EtcdStore, quota_bytes: int = DEFAULT_QUOTA_BYTES, *,
                 repeat_warning_s: float = 600.0) -> None:
        self.store = store
        self.quota_bytes = quota_bytes
        self.repeat_warning_s = repeat_warning_s
        self.status: MemberStatus | None = None
        self.warning: str | None = None
        self.unavailable = ""          # why the status cannot be read (permissions), if so
        self._warned_at = 0.0

    async def step(self) -> None:
        """Read the member's status; log a warning when it starts (and every ``repeat_warning_s``)."""
        if self.unavailable:
            return
        try:
            self.status = await self.store.member_status()   # StoreUnavailable: the loop backs off
        except StoreAuthError as exc:     # our etcd user may not read the status: say so once, stop asking
            self.unavailable = str(exc)
            log.warning("cannot read etcd's database size; no space warnings from this process", error=str(exc))
            return
        warning = space_warning(self.status, self.quota_bytes)
        now = time.monotonic()
        if warning and (self.warning is None or now - self._warned_at >= self.repeat_warning_s):
            log.warning("etcd space", warning=warning, db_size_bytes=self.status.db_size_bytes,
                        quota_bytes=self.quota_bytes)
            self._warned_at = now
        elif warning is None and self.warning is not None:
            log.info("etcd space back under the warning level", db_size_bytes=self.status.db_size_bytes)
        self.warning = warning

    def to_dict(self) -> dict[str, object]:
        """For /readyz."""
        st = self.status
        return {"size_bytes": st.db_size_bytes if st else None, "in_use_bytes": st.db_size_in_use_bytes if st else None,
                "quota_bytes": self.quota_bytes, "alarms": list(st.alarms) if st else [], "warning": self.warning,
                "unavailable": self.unavailable or None}
