"""KeyTable.authenticate's constant-time check compares the digest stored in etcd with the caller's."""

from __future__ import annotations

import hmac

import pytest

from controlplane.pb import ApiKey
from controlplane.store import KeyValue, Resync
from controlplane.store.cache import proto_decoder, to_event
from gateway import auth
from gateway.auth import KeyTable, key_hash, new_api_key


def test_the_final_check_compares_the_stored_digest_not_the_callers_digest_with_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_api_key()
    etcd_key = f"/p/keys/{key_hash(key)}"
    table = KeyTable()
    table.apply(to_event(Resync({etcd_key: KeyValue(etcd_key, ApiKey(key_id="k", owner="o").SerializeToString(),
                                                    1, 1, 1, 0)}, 1), proto_decoder(ApiKey)))
    stored = next(iter(table._by_hash.values()))[0]
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert table.authenticate(f"Bearer {key}").key_id == "k"
    assert len(calls) == 1
    first, second = calls[0]
    # one side is the digest as it came from etcd (the very string object the table holds)
    assert first is stored or second is stored
    assert first == second == key_hash(key)
