"""`ctl usage`: requests and tokens per API key and model, summed over every gateway.

Gateways write cumulative ``usage/<key_id>/<model>/<gateway_id>`` records (no lease: they outlive
the gateway); this command lists the prefix, sums per (key, model), and joins the key's owner
from ``keys/``.

    list usage/ ─▶ decode ─▶ filter (--key, --model) ─▶ sum per (key, model) ─▶ join owners ─▶ --owner
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated

import typer

from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PrefixOpt,
    UserOpt,
    etcd_config,
    open_store,
    run_async,
    warn,
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys, decode_all
from controlplane.pb import ApiKey, Usage
from controlplane.store import EtcdConfig

EXAMPLE = """
Examples:

  ctl usage                                   # every key and model
  ctl usage --owner alice --model llama-3.1-8b
  ctl usage --key 1a2b3c4d -o json | jq '.[].completion_tokens'
"""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one key on one model, summed over gateways."""

    key_id: str
    owner: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    gateways: int
    updated_unix_ms: int


def sum_usage(records: Iterable[Usage], owners: Mapping[str, str], *, key: str | None = None,
              owner: str | None = None, model: str | None = None) -> list[UsageRow]:
    """Sum records per (key, model) after filtering; sorted by owner, key, model (pure)."""
    sums: dict[tuple[str, str], list[int]] = {}
    gateways: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if (key and not r.key_id.startswith(key)) or (model and r.model != model):
            continue
        if owner and owners.get(r.key_id, "") != owner:
            continue
        k = (r.key_id, r.model)
        s = sums.setdefault(k, [0, 0, 0, 0, 0])
        s[0] += r.requests
        s[1] += r.prompt_tokens
        s[2] += r.completion_tokens
        s[3] += r.errors
        s[4] = max(s[4], r.updated_unix_ms)
        gateways.setdefault(k, set()).add(r.gateway_id)
    rows = [UsageRow(k[0], owners.get(k[0], ""), k[1], s[0], s[1], s[2], s[3], len(gateways[k]), s[4])
            for k, s in sums.items()]
    return sorted(rows, key=lambda r: (r.owner, r.key_id, r.model))


async def read_usage(config: EtcdConfig) -> tuple[list[Usage], dict[str, str], list[str]]:
    """Every usage record, key id → owner, and a warning per record that does not decode."""
    keys = Keys(config.prefix)
    store = await open_store(config)
    try:
        usage_kvs, _ = await store.list_prefix(keys.usage)
        key_kvs, _ = await store.list_prefix(keys.api_keys)
    finally:
        await store.close()
    warnings: list[str] = []
    records = [u for _, u in decode_all(Usage, usage_kvs, warnings)]
    owners = {rec.key_id: rec.owner for _, rec in decode_all(ApiKey, key_kvs, warnings)}
    return records, owners, warnings


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ms > 0 else "-"


@app.command(epilog=EXAMPLE)
def usage(
    key: Annotated[str | None, typer.Option("--key", help="Only this key id (a prefix is enough).")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Only keys of this owner.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Show requests, prompt and completion tokens and errors per key and model, over all gateways."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    records, owners, warnings = run_async(lambda: read_usage(config))
    warn(warnings)
    rows = sum_usage(records, owners, key=key.strip().lower() if key else None, owner=owner, model=model)
    if output is OutputFormat.json:
        print_json([asdict(r) for r in rows])
        return
    print_table(
        ["key id", "owner", "model", "requests", "prompt tokens", "completion tokens", "errors", "gateways",
         "updated"],
        [(r.key_id, r.owner or "-", r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.errors, r.gateways,
          _when(r.updated_unix_ms)) for r in rows],
        title=f"Usage ({len(rows)} key/model pairs)",
    )
