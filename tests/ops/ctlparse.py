"""Parse a `ctl` command line with the real CLI's own parser, without running the command.

``parse_ctl(["planner", "run", "--interval", "30"])`` walks the command groups exactly as `ctl`
would, so a renamed or removed flag, a wrong type or a missing required option raises
UsageError; the command's function is never called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer.main

try:  # typer >= 0.2x vendors click (no public alias); older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the typer release
    from click.exceptions import UsageError  # type: ignore[no-redef]

from controlplane.cli.main import _register, app

_register()
_ROOT = typer.main.get_command(app)


class CtlUsageError(ValueError):
    """The command line would not parse."""


def parse_ctl(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The command path (``"planner run"``) and its parsed parameters; CtlUsageError otherwise."""
    args = list(argv)
    try:
        ctx = _ROOT.make_context("ctl", args)
        path: list[str] = []
        while hasattr(ctx.command, "resolve_command"):
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                raise CtlUsageError(f"{' '.join(argv)!r}: no subcommand")
            name, sub, sub_args = ctx.command.resolve_command(ctx, rest)
            if sub is None or name is None:
                raise CtlUsageError(f"{' '.join(argv)!r}: unknown command {rest[0]!r}")
            path.append(name)
            ctx = sub.make_context(name, sub_args, parent=ctx)
    except UsageError as exc:  # NoSuchOption, BadParameter, MissingParameter, … (typer's vendored click)
        raise CtlUsageError(f"{' '.join(argv)!r}: {exc}") from None
    if ctx.args:
        raise CtlUsageError(f"{' '.join(argv)!r}: unexpected arguments {ctx.args}")
    return " ".join(path), dict(ctx.params)
