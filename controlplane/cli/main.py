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


def _register() -> None:
    # One import per command module; each module adds its commands to `app`.
    from controlplane.cli import agent, dev, gateway, keys, models, status  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


if __name__ == "__main__":
    # `python -m controlplane.cli.main` runs this file as __main__; command modules register on the
    # importable module's `app`, so go through it.
    from controlplane.cli.main import main as _main

    _main()
