"""EtcdConfig parsing and the key layout: pure, no etcd needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.keys import Keys, decode_segment, encode_segment
from controlplane.store import EtcdConfig, EtcdConfigError
from controlplane.store.config import parse_endpoint


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:2379", ("127.0.0.1", 2379, False)),
        ("etcd-1", ("etcd-1", 2379, False)),
        ("https://etcd.example:2380", ("etcd.example", 2380, True)),
        ("http://[::1]:2379", ("::1", 2379, False)),
    ],
)
def test_parse_endpoint(raw: str, expected: tuple[str, int, bool]) -> None:
    assert parse_endpoint(raw) == expected


@pytest.mark.parametrize("raw", ["", "ftp://x:1", "http://:2379", "host:notaport"])
def test_parse_endpoint_rejects_garbage(raw: str) -> None:
    with pytest.raises(EtcdConfigError):
        parse_endpoint(raw)


def test_from_env_reads_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELPOOL_ETCD", "a:1, b:2")
    monkeypatch.setenv("MODELPOOL_ETCD_PREFIX", "/pool-x")
    monkeypatch.setenv("MODELPOOL_ETCD_CACERT", str(tmp_path / "ca.pem"))
    cfg = EtcdConfig.from_env()
    assert cfg.endpoints == ("a:1", "b:2") and cfg.prefix == "/pool-x" and cfg.tls
    assert EtcdConfig.from_env("c:3").endpoints == ("c:3",)
    with pytest.raises(EtcdConfigError, match="cannot read ca cert"):
        cfg.read_tls_material()


def test_config_validation() -> None:
    with pytest.raises(EtcdConfigError, match="prefix"):
        EtcdConfig(prefix="nope")
    with pytest.raises(EtcdConfigError, match="both a client certificate and a client key"):
        EtcdConfig(client_cert=Path("c.pem"))
    with pytest.raises(EtcdConfigError, match="user and password"):
        EtcdConfig(user="root")
    assert "secret" not in repr(EtcdConfig(user="u", password="secret"))


@given(st.text(min_size=1, max_size=40))
def test_key_segments_round_trip_and_never_contain_a_slash(name: str) -> None:
    seg = encode_segment(name)
    assert "/" not in seg
    assert decode_segment(seg) == name


def test_hf_style_model_names_stay_one_segment() -> None:
    k = Keys("/p")
    assert k.instance("meta-llama/Llama-3.1-8B", "i1") == "/p/instances/meta-llama%2FLlama-3.1-8B/i1"
    assert k.instance("a", "i").startswith(k.instances)
    assert k.assignment("n1", "a1").startswith(k.desired_for_node("n1"))
