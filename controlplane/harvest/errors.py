"""Errors of the harvester.

    HarvestError
     ├── HarvestConfigError    bad flags or cluster file (unknown partition, unmapped GRES type,
     │                         GPU type without a price): `ctl harvest` exits 2 at start
     └── SlurmCommandError     a Slurm command failed (after its retries); carries argv, rc, stderr
"""

from __future__ import annotations

from collections.abc import Sequence


class HarvestError(Exception):
    """Anything the harvester reports as a failure."""


class HarvestConfigError(HarvestError):
    """The harvester's configuration is wrong; the message says which flag and why."""


class SlurmCommandError(HarvestError):
    """A Slurm command failed: it exited non-zero, timed out, is missing, or printed nonsense."""

    def __init__(self, argv: Sequence[str], message: str, *, returncode: int | None = None,
                 stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = f": {stderr.strip()[-500:]}" if stderr.strip() else ""
        super().__init__(f"{' '.join(self.argv)}: {message}{detail}")
