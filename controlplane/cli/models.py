"""`ctl models apply | list | delete`: the model catalog in etcd (``<prefix>/models/<name>``).

    apply -f FILE ──► load_catalog (validate every entry) ──► read models/ at revision R
                  ──► diff_catalog (pure) ──► one txn: every touched key guarded by its revision
                                               read at R, puts for created/updated, deletes (--prune)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from controlplane.catalog import GIB, CatalogError, load_catalog, spec_to_entry
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
    warn,
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys, RecordDecodeError, decode, decode_segment
from controlplane.pb import ModelSpec
from controlplane.store import Cmp, EtcdConfig, KeyValue, Op

#: etcd's default --max-txn-ops: more compares or operations than this in one txn are refused.
MAX_TXN_OPS = 128

models_app = typer.Typer(help="Apply, list and delete the model catalog (what the planner may place).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


# -- pure core ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogChange:
    """What apply does to one model: created, updated, unchanged or deleted."""

    model: str
    action: str
    spec: ModelSpec | None          # the new record (None for deleted)
    current: KeyValue | None        # what etcd held at the read revision (None for created)


def diff_catalog(wanted: Sequence[ModelSpec], current: dict[str, tuple[KeyValue, ModelSpec | None]],
                 prune: bool) -> list[CatalogChange]:
    """Compare the file's specs with etcd's (name → (kv, decoded spec or None when undecodable))."""
    changes: list[CatalogChange] = []
    for spec in wanted:
        found = current.get(spec.name)
        if found is None:
            changes.append(CatalogChange(spec.name, "created", spec, None))
        else:
            kv, old = found
            changes.append(CatalogChange(spec.name, "unchanged" if old == spec else "updated", spec, kv))
    if prune:
        names = {spec.name for spec in wanted}
        changes.extend(CatalogChange(name, "deleted", None, kv)
                       for name, (kv, _) in sorted(current.items()) if name not in names)
    return changes


def catalog_txn(keys: Keys, changes: Sequence[CatalogChange]) -> tuple[list[Cmp], list[Op]]:
    """Guards and writes for ``changes``: every key must still be as it was read, or absent."""
    compares: list[Cmp] = []
    ops: list[Op] = []
    for change in changes:
        key = change.current.key if change.current is not None else keys.model(change.model)
        compares.append(Cmp.mod_revision(key, change.current.mod_revision) if change.current is not None
                        else Cmp.absent(key))
        if change.action in ("created", "updated") and change.spec is not None:
            ops.append(Op.put(key, change.spec.SerializeToString()))
        elif change.action == "deleted":
            ops.append(Op.delete(key))
    return compares, ops


# -- etcd shell ---------------------------------------------------------------------------------


async def read_catalog(config: EtcdConfig) -> tuple[dict[str, tuple[KeyValue, ModelSpec | None]], int, list[str]]:
    """The catalog in etcd: name → (kv, spec or None), the read revision, decode warnings."""
    store = await open_store(config)
    try:
        kvs, rev = await store.list_prefix(Keys(config.prefix).models)
    finally:
        await store.close()
    out: dict[str, tuple[KeyValue, ModelSpec | None]] = {}
    warnings: list[str] = []
    for kv in kvs:
        try:
            spec = decode(ModelSpec, kv)
        except RecordDecodeError as exc:
            warnings.append(str(exc))
            spec = None
        # the key, not the record's name field, says which model this is: it is what apply writes
        out[decode_segment(kv.key.rsplit("/", 1)[-1])] = (kv, spec)
    return out, rev, warnings


async def apply_catalog(config: EtcdConfig, wanted: Sequence[ModelSpec], prune: bool,
                        dry_run: bool) -> tuple[list[CatalogChange], int, list[str]]:
    """Diff against etcd and write every change in one guarded transaction.

    Returns the changes, the revision written at (or read at, when nothing was written), and the
    names of every model etcd held before.
    """
    current, rev, _ = await read_catalog(config)
    changes = diff_catalog(wanted, current, prune)
    compares, ops = catalog_txn(Keys(config.prefix), changes)
    if max(len(compares), len(ops)) > MAX_TXN_OPS:
        raise CatalogError(f"{len(compares)} models in one apply exceeds etcd's limit of {MAX_TXN_OPS} per "
                           "transaction; split the catalog into several files")
    if dry_run or not ops:
        return changes, rev, sorted(current)
    store = await open_store(config)
    try:
        rev = await store.guarded_txn(compares, ops, f"apply catalog read at revision {rev}")
    finally:
        await store.close()
    return changes, rev, sorted(current)


async def delete_model(config: EtcdConfig, name: str) -> bool:
    """Delete one catalog entry; False when it does not exist."""
    store = await open_store(config)
    key = Keys(config.prefix).model(name)
    try:
        ok, _ = await store.txn([Cmp.create_revision(key, 0, ">")], [Op.delete(key)])
    finally:
        await store.close()
    return ok


# -- commands -----------------------------------------------------------------------------------


@models_app.command(epilog="Example:  ctl models apply -f examples/models.yaml --prune")
def apply(
    file: Annotated[Path, typer.Option("-f", "--file", help="Catalog file, YAML or JSON (see examples/models.yaml).")],
    prune: Annotated[bool, typer.Option("--prune", help="Delete catalog entries that are not in the file.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")] = False,
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Validate every model in FILE, then write them all in one transaction."""
    try:
        wanted = load_catalog(file)
    except CatalogError as exc:
        fail(str(exc), ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    try:
        changes, rev, others = run_async(lambda: apply_catalog(config, wanted, prune, dry_run))
    except CatalogError as exc:
        fail(str(exc), ExitCode.USAGE)
    kept = [name for name in others if name not in {c.model for c in changes}]
    counts = {a: sum(c.action == a for c in changes) for a in ("created", "updated", "unchanged", "deleted")}
    if output is OutputFormat.json:
        print_json({"revision": rev, "dry_run": dry_run, "counts": counts,
                    "changes": [{"model": c.model, "action": c.action} for c in changes]})
        return
    print_table(["model", "action"], [(c.model, c.action) for c in changes],
                title="Dry run: nothing written" if dry_run else None)
    verb = "would apply" if dry_run else "applied"
    print(f"{verb} at revision {rev}: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    if not prune and kept:
        print(f"note: {len(kept)} catalog model(s) not in {file} were kept (use --prune to delete): "
              + ", ".join(kept), file=sys.stderr)


@models_app.command(name="list", epilog="Example:  ctl models list   |   ctl models list -o json > catalog.json")
def list_models(
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List the catalog. `-o json` prints it in the catalog file format `apply -f` reads back."""
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    current, _, warnings = run_async(lambda: read_catalog(config))
    specs = sorted((spec for _, spec in current.values() if spec is not None), key=lambda s: s.name)
    warn(warnings)
    if output is OutputFormat.json:
        print_json({"models": [spec_to_entry(s) for s in specs]})
        return
    print_table(
        ["model", "engine", "memory gib", "replicas", "tp", "gpu types", "access", "servers", "owner"],
        [(s.name, s.engine, _gib(s.weight_memory_bytes + s.kv_memory_bytes),
          f"{s.min_replicas}..{s.max_replicas or '*'}", ",".join(map(str, s.tensor_parallel_options)) or "auto",
          ",".join(s.allowed_gpu_types) or "any", _access(s), ",".join(s.servers) or "any (community)",
          s.owner or "-") for s in specs],
        title=f"Models ({len(specs)})",
    )


@models_app.command(epilog="Example:  ctl models delete llama-3.1-70b")
def delete(
    name: Annotated[str, typer.Argument(help="The model name as `ctl models list` shows it.")],
    etcd: EtcdOpt = None,
    etcd_prefix: PrefixOpt = None,
    etcd_cacert: CaOpt = None,
    etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None,
    etcd_user: UserOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Delete a model from the catalog (the planner stops placing it)."""
    if not name.strip():
        fail("the model name must not be empty", ExitCode.USAGE)
    config = etcd_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user)
    if not run_async(lambda: delete_model(config, name)):
        fail(f"no model {name!r} in the catalog", ExitCode.NOT_FOUND)
    if output is OutputFormat.json:
        print_json({"model": name, "deleted": True})
    else:
        print(f"deleted model {name!r}")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:g}"


def _access(spec: ModelSpec) -> str:
    if spec.access.public or not spec.HasField("access"):
        return "public"
    return "owners: " + (",".join(spec.access.allowed_owners) or "-")
