"""`ctl usage`: requests and tokens per key and model, day, model or owner; `ctl usage compact`.

Gateways write one record per process, day and part (``accounting/writers/…``); the fleet's
elected compactor folds those of stopped gateways into ``accounting/merged/<day>`` and old days
into months (controlplane/accounting/). This command reads all of it (and the legacy
``usage/<key>/<model>/<gateway>`` records of older gateways), sums, and joins owners from keys/.

    list accounting/ + usage/ + keys/ ─▶ decode ─▶ --since ─▶ filters ─▶ sum by --by ─▶ table | json | csv

A record that cannot be decoded is named on stderr and the command exits 255: its counts are
missing from the totals, and a script must not take them as complete.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import sys
import time
from dataclasses import asdict
from typing import Annotated

import typer

from controlplane.accounting.compact import CompactReport, CompactSettings, compact_usage
from controlplane.accounting.report import GROUPINGS, SINCE_FORMS, UsageRead, group, parse_since, read_usage, select
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    ExitCode,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    fail,
    open_store,
    run_async,
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys
from controlplane.store import EtcdConfig

EXAMPLE = """
Examples:

  ctl usage                                   # every key and model, all time
  ctl usage --since 7d --by day               # one row per UTC day of the last week
  ctl usage --since 2026-12-01 --by owner -o csv > december.csv
  ctl usage --owner alice --model llama-3.1-8b
  ctl usage --key 1a2b3c4d -o json | jq '.[].completion_tokens'
  ctl usage compact --dry-run                 # what the fleet's compactor would fold now
"""

usage_app = typer.Typer(invoke_without_command=True, epilog=EXAMPLE)
app.add_typer(usage_app, name="usage")

COLUMNS = {"key": ["owner", "key_id", "model"], "day": ["day"], "model": ["model"], "owner": ["owner"]}
NUMBERS = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors"]


class UsageFormat(enum.StrEnum):
    """-o values of `ctl usage`."""

    table = "table"
    json = "json"
    csv = "csv"


async def _read(config: EtcdConfig) -> UsageRead:
    store = await open_store(config)
    try:
        return await read_usage(store, Keys(config.prefix))
    finally:
        await store.close()


@usage_app.callback()
def usage(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--since", help=f"Only usage from this UTC day on: "
                                              f"{SINCE_FORMS}.")] = None,
    by: Annotated[str, typer.Option("--by", help="Sum per: key (key and model; the default), day, model "
                                    "or owner.")] = "key",
    key: Annotated[str | None, typer.Option("--key", help="Only this key id (a prefix is enough).")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Only keys of this owner.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: Annotated[UsageFormat, typer.Option("-o", "--output", help="table, json or csv.")] = UsageFormat.table,
) -> None:
    """Show requests, prompt and completion tokens and errors, summed over all gateways.

    Days are UTC; usage older than the gateways' --usage-keep-days is kept per month, and a month
    that --since cuts is counted whole (a warning says so).
    """
    if ctx.invoked_subcommand is not None:   # `ctl usage --etcd X compact`: the subcommand uses these too
        ctx.obj = (etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
        return
    if by not in GROUPINGS:
        fail(f"unknown --by {by!r}: accepted values are {', '.join(GROUPINGS)}", ExitCode.USAGE)
    since_day: dt.date | None = None
    if since is not None:
        try:
            since_day = parse_since(since, dt.datetime.now(dt.UTC))
        except ValueError as exc:
            fail(str(exc), ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    read = run_async(lambda: _read(config))
    entries = select(read, since=since_day, key=key.strip().lower() if key else None, owner=owner, model=model)
    rows = group(entries, read.owners, by)
    columns = COLUMNS[by] + NUMBERS
    if output is UsageFormat.json:
        print_json(rows)
    elif output is UsageFormat.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        scope = f" since {since_day.isoformat()}" if since_day else ""
        print_table([c.replace("_", " ") for c in columns],
                    [[r[c] if r[c] != "" else "-" for c in columns] for r in rows],
                    title=f"Usage{scope} by {by} ({len(rows)} rows)")
    for month in read.partial:
        print(f"warning: usage of {month} is kept per month: counted whole although --since starts inside it",
              file=sys.stderr)
    if read.undecodable:
        for problem in read.undecodable:
            print(f"error: undecodable usage record, NOT in the totals: {problem}", file=sys.stderr)
        fail(f"{len(read.undecodable)} usage record(s) could not be decoded; the totals above exclude them "
             "(inspect or delete the keys named above with etcdctl)", ExitCode.ERROR)


@usage_app.command(epilog="Example:  ctl usage compact --dry-run   |   ctl usage compact --keep-days 60 -o json")
def compact(
    ctx: typer.Context,
    keep_days: Annotated[int, typer.Option("--keep-days", min=3, help="Merged days older than this become months "
                                           "(use the gateways' --usage-keep-days).")] = 40,
    grace: Annotated[float, typer.Option("--grace", min=0, help="Seconds a stopped gateway's records must have been "
                                         "silent before they are folded (clean stops are folded at once).")] = 600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be folded.")] = False,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Fold the usage records of stopped gateways, old days and legacy records now.

    The elected gateway does this every --usage-compact-interval; running it by hand is safe at any
    time (every fold is one guarded transaction; a race with the gateway just retries later).
    """
    p = ctx.obj if isinstance(ctx.obj, tuple) else (None,) * 6   # `ctl usage --etcd X compact`
    config = etcd_config(etcd or p[0], etcd_prefix or p[1], etcd_cacert or p[2], etcd_cert or p[3], etcd_key or p[4],
                         etcd_user or p[5])
    settings = CompactSettings(keep_days=keep_days, grace_s=grace, max_txns=100_000)

    async def run() -> CompactReport:
        store = await open_store(config)
        try:
            return await compact_usage(store, Keys(config.prefix), time.time(), settings, dry_run=dry_run)
        finally:
            await store.close()

    report = run_async(run)
    if output is OutputFormat.json:
        print_json(asdict(report))
    else:
        print_table(["record", "into", "why"], report.folded,
                    title=f"{'Would fold' if dry_run else 'Folded'} {len(report.folded)} record(s) in "
                          f"{report.transactions} transaction(s)")
    for problem in report.undecodable:
        print(f"warning: undecodable record left as it is: {problem}", file=sys.stderr)
    if report.pending:
        print(f"warning: {report.pending} record(s) left for the next run (the state changed meanwhile)",
              file=sys.stderr)
