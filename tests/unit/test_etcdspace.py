"""etcd space: sizes, the warning near the quota (pure)."""

from __future__ import annotations

import pytest

from controlplane.etcdspace import human, parse_bytes, space_warning
from controlplane.store import MemberStatus


def status(size: int, in_use: int | None = None, alarms: tuple[str, ...] = ()) -> MemberStatus:
    return MemberStatus("e:2379", "3.5.1", size, size if in_use is None else in_use, 1, 1, alarms)


def test_sizes_parse_with_iec_and_si_units_and_name_the_forms_otherwise() -> None:
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512 MiB") == 512 * 1024**2
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("1000000") == 10**6
    for bad in ("lots", "2 GiBs", "-1", ""):
        with pytest.raises(ValueError, match="KiB/MiB/GiB"):
            parse_bytes(bad)
    assert human(1536 * 1024**2) == "1.5 GiB" and human(12) == "12 B"


def test_warning_at_80_percent_of_the_quota_and_on_nospace() -> None:
    quota = 2 * 1024**3
    assert space_warning(status(int(0.79 * quota)), quota) is None
    w = space_warning(status(int(0.85 * quota), in_use=int(0.25 * quota)), quota)
    assert w is not None and "85% of its 2.0 GiB quota" in w and "1.2 GiB reclaimable by defragmentation" in w
    w = space_warning(status(10, alarms=("NOSPACE",)), quota)
    assert w is not None and "NOSPACE" in w and "disarmed" in w
