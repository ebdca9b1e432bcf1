"""Aligned tables and JSON for `ctl` commands (kubectl's -o habit)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from controlplane.cli.common import OutputFormat


def print_json(data: Any) -> None:
    """Pretty JSON on stdout, for scripts (`-o json`)."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """An aligned, borderless table with upper-case headers (Nomad/kubectl style)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left",
                  title_style="bold")
    for col in columns:
        table.add_column(col.upper(), overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(width=max(160, Console().width)).print(table)


def emit(fmt: OutputFormat, data: Any, columns: Sequence[str], rows: Sequence[Sequence[Any]],
         title: str | None = None) -> None:
    """Print ``data`` as JSON or ``rows`` as a table, by ``fmt``."""
    if fmt is OutputFormat.json:
        print_json(data)
    else:
        print_table(columns, rows, title)


def age(ms: int, now_ms: int) -> str:
    """A short human age like 5s, 3m, 2h, 4d."""
    if ms <= 0:
        return "-"
    s = max(0, (now_ms - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"
