"""An etcd with authentication on, made by `ctl auth enable`, and the credentials `ctl` made for it.

Auth is global to an etcd, so tests of it start their own (the session etcd of conftest.py stays
open). Its tokens expire after 2 s idle (``--auth-token-ttl 2``): every test on it also runs
through token expiry.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import controlplane.cli.auth
import controlplane.cli.plan
import controlplane.cli.status
import controlplane.cli.tenants  # noqa: F401  (register the commands)
from controlplane.cli.main import app
from controlplane.etcdproc import EtcdProcess
from controlplane.keys import Keys
from controlplane.pb import InstanceRecord, InstanceState
from controlplane.store import EtcdConfig, EtcdStore, StoreAuthError

ROOT_PASSWORD = "root-" + uuid.uuid4().hex
TOKEN_TTL_S = 2


@dataclass
class AuthPool:
    """The auth-enabled etcd of this module and the credentials `ctl` made for it."""

    etcd: EtcdProcess
    prefix: str
    home: Path
    passwords: dict[str, str] = field(default_factory=dict)   # etcd user -> password

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def config(self, user: str | None) -> EtcdConfig:
        password = None if user is None else ROOT_PASSWORD if user == "root" else self.passwords[user]
        return EtcdConfig(endpoints=(self.etcd.endpoint,), prefix=self.prefix, user=user, password=password,
                          timeout_s=3.0)

    def password_file(self, user: str) -> Path:
        path = self.home / f"{user}.pw"
        path.write_text(self.passwords[user] + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    def ctl(self, *args: str, user: str = "root", password: str | None = None) -> tuple[int, str, str]:
        env = {"MODELPOOL_ETCD_USER": user,
               "MODELPOOL_ETCD_PASSWORD": password if password is not None else (
                   ROOT_PASSWORD if user == "root" else self.passwords[user])}
        res = CliRunner().invoke(app, [*args, "--etcd", self.etcd.endpoint, "--etcd-prefix", self.prefix], env=env)
        return res.exit_code, res.stdout, res.stderr

    def ctl_json(self, *args: str, user: str = "root") -> Any:
        code, out, err = self.ctl(*args, "-o", "json", user=user)
        assert code == 0, (args, out, err)
        return json.loads(out)


def auth_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthPool]:
    """Start the etcd, `ctl auth enable`, tenants alpha, beta, gamma and users gw, planner-1, ops."""
    etcd = EtcdProcess.in_temp_dir(extra_args=("--auth-token-ttl", str(TOKEN_TTL_S), "--bcrypt-cost", "4")).start()
    p = AuthPool(etcd, "/mp-auth", tmp_path_factory.mktemp("auth"))
    try:
        enabled = p.ctl_json("auth", "enable")
        assert enabled["was_enabled"] is False and enabled["root_user"] == "created"
        for tenant in ("alpha", "beta", "gamma"):
            made = p.ctl_json("tenants", "create", tenant)
            assert made["user"] == f"tenant-{tenant}" and len(made["password"]) >= 24
            p.passwords[made["user"]] = made["password"]
        for user, role in (("gw", "gateway"), ("planner-1", "planner"), ("ops", "admin")):
            made = p.ctl_json("auth", "user", "create", user, "--role", role)
            assert made == {"user": user, "role": role, "password": made["password"]}
            p.passwords[user] = made["password"]
        yield p
    finally:
        etcd.stop()


@contextlib.asynccontextmanager
async def connected(config: EtcdConfig) -> AsyncIterator[EtcdStore]:
    store = await EtcdStore(config).connect()
    try:
        yield store
    finally:
        await store.close()


def instance(model: str, iid: str, url: str, node: str = "n1") -> bytes:
    return InstanceRecord(instance_id=iid, model=model, node_id=node, endpoint=url, state=InstanceState.READY,
                          engine="sim").SerializeToString()


async def denied(store: EtcdStore, key: str) -> None:
    with pytest.raises(StoreAuthError, match="permission denied"):
        await store.put(key, b"x")
