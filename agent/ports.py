"""Engine ports: any free port (the OS picks), or one from ``--engine-port-range`` for sites
whose firewalls open only some ports between gateways and compute nodes.

    PortRange.parse("8100-8199") ─▶ PortPicker(range, in_use=lambda: ports this agent's instances hold)
        pick(host): start at a random port of the range, try each in turn, skip ports in use by this
        agent's other instances (an engine may not have bound its port yet), return the first one
        the OS lets us bind; PortRangeExhausted when none is free.

A port checked free can still be taken before the engine binds it; the engine then fails to
start, the instance is marked FAILED and restarts on another pick (agent/instance.py).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controlplane.netutil import free_port


class PortRangeError(ValueError):
    """A malformed ``--engine-port-range``."""


class PortRangeExhausted(OSError):
    """Every port of the range is in use (raised from ``pick``; the instance reports it and retries)."""


@dataclass(frozen=True)
class PortRange:
    """Ports ``low`` to ``high``, both included."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """``"8100-8199"`` or a single ``"8100"``; PortRangeError otherwise."""
        low_s, sep, high_s = text.strip().partition("-")
        high_s = high_s if sep else low_s
        if not (low_s.strip().isdigit() and high_s.strip().isdigit()):
            raise PortRangeError(f"--engine-port-range expects LOW-HIGH (e.g. 8100-8199), got {text!r}")
        low, high = int(low_s), int(high_s)
        if not 1 <= low <= high <= 65535:
            raise PortRangeError(f"--engine-port-range {text!r}: need 1 <= LOW <= HIGH <= 65535")
        return cls(low, high)

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


def candidate_order(ports: PortRange, start: int, skip: Iterable[int]) -> list[int]:
    """The range's ports from ``start`` (wrapping around), less ``skip``: the order ``pick`` tries."""
    skipped = set(skip)
    n = len(ports)
    offset = (start - ports.low) % n
    return [p for i in range(n) if (p := ports.low + (offset + i) % n) not in skipped]


def can_bind(host: str, port: int) -> bool:
    """True when a TCP socket can bind ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PortPicker:
    """Picks engine ports for one agent (``ManagedInstance``'s ``port_picker``)."""

    def __init__(self, ports: PortRange | None, in_use: Callable[[], Iterable[int]] = tuple,
                 rng: random.Random | None = None) -> None:
        self.ports = ports
        self._in_use = in_use
        self._rng = rng or random.Random()

    def __call__(self, host: str) -> int:
        """A free port on ``host``: from the range when one is set, else any the OS gives."""
        if self.ports is None:
            return free_port(host)
        start = self._rng.randint(self.ports.low, self.ports.high)  # spread agents sharing a host
        for port in candidate_order(self.ports, start, self._in_use()):
            if can_bind(host or "0.0.0.0", port):
                return port
        raise PortRangeExhausted(f"no free port in --engine-port-range {self.ports} on {host or '0.0.0.0'}")
