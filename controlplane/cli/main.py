"""`ctl`: the one command-line tool for modelpool. Each command lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ctl",
    help="modelpool: pool idle HPC GPUs into one OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Command modules under controlplane/cli/, one per line, in `ctl --help` order.
COMMAND_MODULES = (
    "dev",
    "status",
    "agent",
    "gateway",
    "models",
    "keys",
    "plan",
    "harvest",
    "profile",
    "nodes",
    "usage",
    "exporter",
    "auth",
    "tenants",
)


def _register() -> None:
    # One import per command module; each module adds its commands to `app` when imported.
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"controlplane.cli.{name}")


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    # `python -m controlplane.cli.main` runs this file as __main__; command modules register on the
    # importable module's `app`, so go through it.
    from controlplane.cli.main import main as _main

    _main()
