"""`ctl keys` and `ctl models` against a real etcd, through the real typer app.

The CLI runs its own event loop (run_async), so each invocation runs in a worker thread while the
test's loop keeps the `store` fixture for checking what landed in etcd.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

import controlplane.cli.keys  # noqa: F401  (registers `ctl keys`; `ctl models` registers via the import below)
from controlplane.catalog import GIB, KNOWN_ENGINES, KNOWN_TP_DEGREES, CatalogError, load_catalog, parse_catalog
from controlplane.cli.common import ExitCode
from controlplane.cli.keys import ExpiryError, key_status, parse_expiry
from controlplane.cli.main import app
from controlplane.cli.models import catalog_txn, diff_catalog, read_catalog
from controlplane.keys import Keys, decode
from controlplane.pb import ApiKey, ModelSpec
from controlplane.store import EtcdConfig, EtcdStore, Resync, TxnConflict
from controlplane.store.cache import proto_decoder, to_event
from gateway.auth import KeyTable, key_hash
from gateway.errors import Unauthorized

KEYS = proto_decoder(ApiKey)  # what the gateway's cache decodes with

REPO = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


async def ctl(config: EtcdConfig, *args: str) -> Result:
    """Run `ctl ARGS --etcd ... --etcd-prefix ...` in a thread (the CLI starts its own loop)."""
    argv = [*args, "--etcd", ",".join(config.endpoints), "--etcd-prefix", config.prefix]
    return await asyncio.to_thread(CliRunner().invoke, app, argv, catch_exceptions=False)


def write_catalog(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    return path


# -- keys -----------------------------------------------------------------------------------------


async def test_create_stores_only_the_hash_and_the_gateway_accepts_the_key(
    etcd_config: EtcdConfig, store: EtcdStore
) -> None:
    res = await ctl(etcd_config, "keys", "create", "--owner", "alice", "--models", "m1, m2,,m1", "--rpm", "60",
                    "--tpm", "5000", "--expires", "30d", "--description", "ci key", "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert "cannot be shown again" in res.stderr
    out = json.loads(res.stdout)
    key = out["key"]
    digest = key_hash(key)
    assert out["key_id"] == digest[:8]
    assert out["owner"] == "alice" and out["allowed_models"] == ["m1", "m2"]
    assert out["status"] == "active"

    kvs, _ = await store.list_prefix(Keys(etcd_config.prefix).api_keys)
    assert [kv.key for kv in kvs] == [Keys(etcd_config.prefix).api_key(digest)]
    assert key.encode() not in kvs[0].value and key.encode() not in kvs[0].key.encode()
    record = decode(ApiKey, kvs[0])
    assert (record.key_id, record.owner, list(record.allowed_models)) == (digest[:8], "alice", ["m1", "m2"])
    assert (record.requests_per_minute, record.tokens_per_minute, record.description) == (60, 5000, "ci key")
    assert record.expires_unix - record.created_unix == 30 * 86400
    assert "not in the model catalog" in res.stderr and "m1" in res.stderr

    # the gateway's own table, fed what etcd holds, authenticates the printed key
    table = KeyTable()
    table.apply(to_event(Resync({kv.key: kv for kv in kvs}, 0), KEYS))
    assert table.authenticate(f"Bearer {key}").owner == "alice"

    # revoke flips it, and the gateway then refuses the key
    res = await ctl(etcd_config, "keys", "revoke", out["key_id"])
    assert res.exit_code == 0, res.stderr
    assert f"revoked key {out['key_id']}" in res.stdout
    kv = await store.get(Keys(etcd_config.prefix).api_key(digest))
    assert kv is not None and decode(ApiKey, kv).revoked
    assert decode(ApiKey, kv).owner == "alice"  # everything else kept
    table.apply(to_event(Resync({kv.key: kv}, 0), KEYS))
    with pytest.raises(Unauthorized, match="revoked"):
        table.authenticate(f"Bearer {key}")

    res = await ctl(etcd_config, "keys", "revoke", out["key_id"])
    assert res.exit_code == 0 and "already revoked" in res.stdout


async def test_list_shows_id_and_status_never_the_key(etcd_config: EtcdConfig, store: EtcdStore) -> None:
    created = []
    for owner in ("bob", "carol"):
        res = await ctl(etcd_config, "keys", "create", "--owner", owner, "-o", "json")
        assert res.exit_code == 0, res.stderr
        created.append(json.loads(res.stdout))
    # an expired key, written directly: the CLI refuses to create one
    expired = ApiKey(key_id="e" * 8, owner="dave", expires_unix=1, created_unix=1)
    await store.put(Keys(etcd_config.prefix).api_key("e" * 64), expired.SerializeToString())
    res = await ctl(etcd_config, "keys", "revoke", created[1]["key_id"])
    assert res.exit_code == 0, res.stderr

    res = await ctl(etcd_config, "keys", "list", "-o", "json")
    assert res.exit_code == 0, res.stderr
    rows = {r["owner"]: r for r in json.loads(res.stdout)}
    assert {o: r["status"] for o, r in rows.items()} == {"bob": "active", "carol": "revoked", "dave": "expired"}
    assert rows["bob"]["key_id"] == created[0]["key_id"]
    for c in created:
        assert c["key"] not in res.stdout and key_hash(c["key"]) not in res.stdout

    res = await ctl(etcd_config, "keys", "list")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("KEY ID" in line and "STATUS" in line for line in lines)
    bob_line = next(line for line in lines if "bob" in line)
    assert created[0]["key_id"] in bob_line and "active" in bob_line and "never" in bob_line
    assert all(c["key"] not in res.stdout for c in created)


async def test_revoke_unknown_and_ambiguous_ids(etcd_config: EtcdConfig, store: EtcdStore) -> None:
    keys = Keys(etcd_config.prefix)
    first, second = "abcd1111" + "0" * 56, "abcd2222" + "0" * 56
    for digest, owner in ((first, "x"), (second, "y")):
        await store.put(keys.api_key(digest), ApiKey(key_id=digest[:8], owner=owner).SerializeToString())

    res = await ctl(etcd_config, "keys", "revoke", "abcd")
    assert res.exit_code == ExitCode.USAGE
    assert "ambiguous" in res.stderr and "abcd1111" in res.stderr and "abcd2222" in res.stderr

    res = await ctl(etcd_config, "keys", "revoke", "ffff0000")
    assert res.exit_code == ExitCode.NOT_FOUND and res.stderr.startswith("error: no API key")

    res = await ctl(etcd_config, "keys", "revoke", "not-hex")
    assert res.exit_code == ExitCode.USAGE

    res = await ctl(etcd_config, "keys", "revoke", "ABCD2")  # a unique prefix, any case
    assert res.exit_code == 0, res.stderr
    kv1, kv2 = await store.get(keys.api_key(first)), await store.get(keys.api_key(second))
    assert kv1 is not None and kv2 is not None
    assert not decode(ApiKey, kv1).revoked and decode(ApiKey, kv2).revoked


async def test_bad_create_input_exits_2_and_writes_nothing(etcd_config: EtcdConfig, store: EtcdStore) -> None:
    for args in (("--owner", "a", "--expires", "2001-01-01"), ("--owner", "a", "--expires", "soon"),
                 ("--owner", " "), ("--owner", "a", "--rpm", "-1")):
        res = await ctl(etcd_config, "keys", "create", *args)
        assert res.exit_code == ExitCode.USAGE, (args, res.stdout, res.stderr)
    kvs, _ = await store.list_prefix(Keys(etcd_config.prefix).api_keys)
    assert kvs == []


def test_parse_expiry() -> None:
    assert parse_expiry("never", NOW) == 0
    assert parse_expiry("0", NOW) == 0
    assert parse_expiry("30d", NOW) == NOW + 30 * 86400
    assert parse_expiry("12h", NOW) == NOW + 12 * 3600
    assert parse_expiry("90m", NOW) == NOW + 90 * 60
    assert parse_expiry("2w", NOW) == NOW + 14 * 86400
    assert parse_expiry("2027-12-31", NOW) == int(datetime(2027, 12, 31, tzinfo=UTC).timestamp())
    assert parse_expiry("2027-12-31T12:00:00+02:00", NOW) == int(datetime(2027, 12, 31, 10, tzinfo=UTC).timestamp())
    assert parse_expiry("2027-12-31T12:00:00", NOW) == int(datetime(2027, 12, 31, 12, tzinfo=UTC).timestamp())
    assert parse_expiry(str(int(NOW) + 5), NOW) == NOW + 5
    for bad in ("yesterday", "2027-13-01", "-5", "0d", "5y", "2026-12-31", str(int(NOW)), "99999999999999"):
        with pytest.raises(ExpiryError, match="--expires"):
            parse_expiry(bad, NOW)


def test_key_status() -> None:
    assert key_status(ApiKey(), NOW) == "active"
    assert key_status(ApiKey(expires_unix=int(NOW) + 1), NOW) == "active"
    assert key_status(ApiKey(expires_unix=int(NOW)), NOW) == "expired"
    assert key_status(ApiKey(expires_unix=int(NOW) - 1, revoked=True), NOW) == "revoked"


# -- models ---------------------------------------------------------------------------------------


async def test_apply_is_idempotent_and_prune_deletes(etcd_config: EtcdConfig, store: EtcdStore,
                                                     tmp_path: Path) -> None:
    res = await ctl(etcd_config, "models", "apply", "-f", str(REPO / "examples" / "models.yaml"), "-o", "json")
    assert res.exit_code == 0, res.stderr
    first = json.loads(res.stdout)
    names = [c["model"] for c in first["changes"]]
    assert "Qwen/Qwen2.5-Coder-7B-Instruct" in names
    assert {c["action"] for c in first["changes"]} == {"created"}
    kvs, rev = await store.list_prefix(Keys(etcd_config.prefix).models)
    assert len(kvs) == len(names) and {kv.mod_revision for kv in kvs} == {first["revision"]}  # one transaction
    spec = decode(ModelSpec, next(kv for kv in kvs if kv.key == Keys(etcd_config.prefix).model("llama-3.1-70b")))
    assert spec.weight_memory_bytes == 140 * GIB and list(spec.tensor_parallel_options) == [2, 4]
    assert list(spec.access.allowed_owners) == ["ml-team"] and not spec.access.public

    res = await ctl(etcd_config, "models", "apply", "-f", str(REPO / "examples" / "models.yaml"), "-o", "json")
    assert res.exit_code == 0, res.stderr
    second = json.loads(res.stdout)
    assert {c["action"] for c in second["changes"]} == {"unchanged"}
    assert await store.revision() == rev  # nothing written

    # `list -o json` is a catalog file: applying it back changes nothing
    res = await ctl(etcd_config, "models", "list", "-o", "json")
    assert res.exit_code == 0, res.stderr
    listed = tmp_path / "listed.json"
    listed.write_text(res.stdout, encoding="utf-8")
    assert sorted(s.name for s in load_catalog(listed)) == sorted(names)
    res = await ctl(etcd_config, "models", "apply", "-f", str(listed), "-o", "json")
    assert json.loads(res.stdout)["counts"] == {"created": 0, "updated": 0, "unchanged": len(names), "deleted": 0}

    # change one, add one, drop the rest: without --prune the rest stay
    small = write_catalog(tmp_path / "small.yaml", [
        {"name": "llama-3.1-8b", "engine": "vllm", "weight_memory_gib": 16, "kv_memory_gib": 8},
        {"name": "new-model", "engine": "sim", "weight_memory_gib": 1},
    ])
    res = await ctl(etcd_config, "models", "apply", "-f", str(small), "--dry-run", "-o", "json")
    assert json.loads(res.stdout)["counts"] == {"created": 1, "updated": 1, "unchanged": 0, "deleted": 0}
    assert await store.revision() == rev
    res = await ctl(etcd_config, "models", "apply", "-f", str(small))
    assert res.exit_code == 0, res.stderr
    assert "1 created, 1 updated, 0 unchanged, 0 deleted" in res.stdout
    assert "--prune" in res.stderr
    kvs, _ = await store.list_prefix(Keys(etcd_config.prefix).models)
    assert len(kvs) == len(names) + 1
    res = await ctl(etcd_config, "models", "apply", "-f", str(small), "--prune", "-o", "json")
    counts = json.loads(res.stdout)["counts"]
    assert counts == {"created": 0, "updated": 0, "unchanged": 2, "deleted": len(names) - 1}
    kvs, _ = await store.list_prefix(Keys(etcd_config.prefix).models)
    assert sorted(decode(ModelSpec, kv).name for kv in kvs) == ["llama-3.1-8b", "new-model"]

    res = await ctl(etcd_config, "models", "list")
    assert res.exit_code == 0 and "new-model" in res.stdout and "MEMORY GIB" in res.stdout


async def test_bad_catalog_exits_2_naming_the_model_and_writes_nothing(
    etcd_config: EtcdConfig, store: EtcdStore, tmp_path: Path
) -> None:
    cases: dict[str, tuple[dict[str, Any], ...]] = {
        "engine": ({"name": "good", "weight_memory_gib": 1},
                   {"name": "bad-engine", "engine": "tgi", "weight_memory_gib": 1}),
        "min_replicas": ({"name": "too-few", "weight_memory_gib": 1, "min_replicas": 3, "max_replicas": 2},),
        "tensor_parallel_options": ({"name": "odd-tp", "weight_memory_gib": 1, "tensor_parallel_options": [3]},),
        "weight_memory_gib": ({"name": "no-memory"},),
        "colour": ({"name": "typo", "weight_memory_gib": 1, "colour": "red"},),
    }
    for field, models in cases.items():
        path = write_catalog(tmp_path / f"{field}.yaml", list(models))
        res = await ctl(etcd_config, "models", "apply", "-f", str(path))
        assert res.exit_code == ExitCode.USAGE, (field, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ")
        assert f"model '{models[-1]['name']}'" in res.stderr and f"'{field}'" in res.stderr, res.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": [', encoding="utf-8")
    res = await ctl(etcd_config, "models", "apply", "-f", str(broken))
    assert res.exit_code == ExitCode.USAGE and "invalid JSON" in res.stderr
    res = await ctl(etcd_config, "models", "apply", "-f", str(tmp_path / "missing.yaml"))
    assert res.exit_code == ExitCode.USAGE and "cannot read" in res.stderr
    kvs, _ = await store.list_prefix(Keys(etcd_config.prefix).models)
    assert kvs == []  # "good" was valid, but nothing is written unless everything is


async def test_delete_model(etcd_config: EtcdConfig, store: EtcdStore, tmp_path: Path) -> None:
    path = write_catalog(tmp_path / "c.yaml", [{"name": "org/model-a", "weight_memory_gib": 2}])
    assert (await ctl(etcd_config, "models", "apply", "-f", str(path))).exit_code == 0
    res = await ctl(etcd_config, "models", "delete", "org/model-a", "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {"model": "org/model-a", "deleted": True}
    assert await store.get(Keys(etcd_config.prefix).model("org/model-a")) is None
    res = await ctl(etcd_config, "models", "delete", "org/model-a")
    assert res.exit_code == ExitCode.NOT_FOUND and "org/model-a" in res.stderr


def test_catalog_parsing_rules() -> None:
    specs = parse_catalog([{"name": "m", "weight_memory_gib": 1.5, "tensor_parallel_options": [4, 1, 4]}])
    assert specs[0].weight_memory_bytes == int(1.5 * GIB) and list(specs[0].tensor_parallel_options) == [1, 4]
    assert specs[0].engine == "vllm" and specs[0].access.public
    assert parse_catalog({"models": []}) == [] and parse_catalog(None) == []
    with pytest.raises(CatalogError, match=r"model 'm': field 'name': duplicate of models\[0\]"):
        parse_catalog([{"name": "m", "weight_memory_gib": 1}, {"name": "m", "weight_memory_gib": 2}])
    with pytest.raises(CatalogError, match=r"models\[0\]: field 'name'"):
        parse_catalog([{"weight_memory_gib": 1}])
    with pytest.raises(CatalogError, match="expected a mapping"):
        parse_catalog(["just-a-name"])
    with pytest.raises(CatalogError, match="'models' must be a list"):
        parse_catalog({"models": {"name": "m"}})


def test_catalog_constants_match_agent_and_planner() -> None:
    from agent.engines import ADAPTERS
    from controlplane.planner.snapshot import KNOWN_TP_DEGREES as PLANNER_TP

    assert set(KNOWN_ENGINES) == set(ADAPTERS)
    assert KNOWN_TP_DEGREES == PLANNER_TP


def test_every_command_shows_an_example() -> None:
    for args in (["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["models", "apply"], ["models", "list"],
                 ["models", "delete"]):
        res = CliRunner().invoke(app, [*args, "--help"])
        assert res.exit_code == 0 and "Example:" in res.stdout, args


def test_create_in_a_real_process_prints_clean_json(etcd_config: EtcdConfig) -> None:
    code = "import controlplane.cli.keys, controlplane.cli.models; from controlplane.cli.main import app; app()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "keys", "create", "--owner", "proc", "-o", "json",
         "--etcd", etcd_config.endpoints[0], "--etcd-prefix", etcd_config.prefix],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["key"].startswith("mp-") and out["key_id"] == key_hash(out["key"])[:8]


@pytest.mark.parametrize("race", ["modified", "deleted", "created"])
async def test_apply_transaction_refuses_a_catalog_changed_since_the_read(
    etcd_config: EtcdConfig, store: EtcdStore, race: str
) -> None:
    keys = Keys(etcd_config.prefix)
    wanted = parse_catalog([{"name": "a", "engine": "sim", "weight_memory_gib": 0},
                            {"name": "b", "engine": "sim", "weight_memory_gib": 1}])
    await store.put(keys.model("a"), wanted[0].SerializeToString())
    current, _, _ = await read_catalog(etcd_config)
    changes = diff_catalog(wanted, current, prune=False)
    assert [(c.model, c.action) for c in changes] == [("a", "unchanged"), ("b", "created")]
    # someone else writes between our read and our transaction
    if race == "modified":
        await store.put(keys.model("a"), ModelSpec(name="a", engine="vllm").SerializeToString())
    elif race == "deleted":
        await store.delete(keys.model("a"))
    else:
        await store.put(keys.model("b"), ModelSpec(name="b", engine="vllm").SerializeToString())
    compares, ops = catalog_txn(keys, changes)
    with pytest.raises(TxnConflict):
        await store.guarded_txn(compares, ops, "apply")
