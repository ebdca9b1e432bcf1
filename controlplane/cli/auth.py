"""`ctl auth enable | disable | status` and `ctl auth user create | delete | list`: etcd authentication.

These run as etcd's root user: ``--etcd-user`` (default ``root``) with the password from
MODELPOOL_ETCD_PASSWORD (or ``--etcd-password-file`` / MODELPOOL_ETCD_PASSWORD_FILE). The roles
are controlplane/roles.py's; docs/security.md explains who gets which.

    enable       ──► root user (create / set password while auth is off) ──► sync roles ──► auth on
    user create  ──► sync the role ──► user with a random password ──► print it once
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from controlplane.authadmin import (
    ROOT,
    AuthAdminError,
    create_user,
    delete_user,
    disable_auth,
    enable_auth,
    list_users,
)
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    ExitCode,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PasswordFileOpt,
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
from controlplane.roles import ServiceRole, role_perms
from controlplane.store import EtcdConfig, EtcdStore
from controlplane.store.admin import EtcdAdmin

T = TypeVar("T")

auth_app = typer.Typer(help="etcd authentication: turn it on, make service users (run as etcd's root).",
                       no_args_is_help=True)
user_app = typer.Typer(help="etcd users of modelpool's services (gateway, planner, admin, harvester).",
                       no_args_is_help=True)
auth_app.add_typer(user_app, name="user")
app.add_typer(auth_app, name="auth")

RoleOpt = Annotated[ServiceRole, typer.Option("--role", help="What the user may do (docs/security.md, role table).")]


def root_config(etcd: str | None, prefix: str | None, cacert: Path | None, cert: Path | None, key: Path | None,
                user: str | None, password_file: Path | None, *, need_password: bool = False) -> EtcdConfig:
    """etcd settings as root (or ``--etcd-user``); exits 2 when a password is needed but missing."""
    config = etcd_config(etcd, prefix, cacert, cert, key, user or ROOT, password_file)
    if need_password and not config.password:
        fail(f"no password for etcd user {config.user!r}: set MODELPOOL_ETCD_PASSWORD or --etcd-password-file",
             ExitCode.USAGE)
    if not config.password:  # no password: talk to an etcd whose auth is off, as nobody
        config = config.with_credentials(None, None)
    return config


def run_admin(config: EtcdConfig, fn: Callable[[EtcdStore], Awaitable[T]]) -> T:
    """Run ``fn`` on a connected store; AuthAdminError exits with its code and message."""
    async def go() -> T:
        store = await open_store(config)
        try:
            return await fn(store)
        finally:
            await store.close()
    try:
        return run_async(go)
    except AuthAdminError as exc:
        fail(str(exc), ExitCode(exc.code))


@auth_app.command(epilog="Example:  MODELPOOL_ETCD_PASSWORD=$(cat root.pw) ctl auth enable --etcd etcd1:2379")
def enable(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Create (or refresh) the roles gateway, planner, admin, harvester and every tenant's, then
    turn etcd authentication on. Idempotent: run it again after an upgrade to update the roles.

    While auth is off the root user is created with the password given (or, when it exists,
    given that password), so that the operator can log in afterwards.
    """
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file,
                         need_password=True)
    password = config.password or ""
    report = run_admin(config, lambda store: enable_auth(store, Keys(config.prefix), password))
    if output is OutputFormat.json:
        print_json(report.to_dict())
        return
    print_table(["role", "granted", "revoked"], [(r, c["granted"], c["revoked"]) for r, c in report.roles.items()],
                title="Roles")
    state = "was already on" if report.was_enabled else "is now on"
    print(f"etcd authentication {state}; root user: {report.root}")


@auth_app.command(epilog="Example:  MODELPOOL_ETCD_PASSWORD=$(cat root.pw) ctl auth disable")
def disable(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Turn etcd authentication off (every tenant can then write anything: only for a rollback)."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file,
                         need_password=True)
    changed = run_admin(config, disable_auth)
    if output is OutputFormat.json:
        print_json({"enabled": False, "changed": changed})
    else:
        print("etcd authentication is now off" if changed else "etcd authentication was already off")


@auth_app.command(epilog="Example:  ctl auth status   |   ctl auth status -o json | jq '.roles[].role'")
def status(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Whether auth is on, and each modelpool role with its users and permissions on this pool."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    keys = Keys(config.prefix)

    async def read(store: EtcdStore) -> dict[str, Any]:
        admin = EtcdAdmin(store)
        enabled = await admin.auth_enabled()
        users = {u: await admin.user_roles(u) or [] for u in await admin.users()}
        roles = []
        for role in await admin.roles():
            perms = await admin.role_perms(role)
            try:
                expected = role_perms(keys, role)
            except ValueError:
                expected = None
            roles.append({"role": role, "users": sorted(u for u, rs in users.items() if role in rs),
                          "permissions": [p.describe(keys.prefix) for p in perms],
                          "up_to_date": None if expected is None else tuple(
                              p for p in perms if p.key.startswith(keys.root)) == expected})
        return {"enabled": enabled, "roles": roles}

    data = run_admin(config, read)
    if output is OutputFormat.json:
        print_json(data)
        return
    print(f"etcd authentication: {'on' if data['enabled'] else 'off'}")
    print_table(["role", "users", "permissions", "current"],
                [(r["role"], ",".join(r["users"]) or "-", "; ".join(r["permissions"]) or "-",
                  "-" if r["up_to_date"] is None else "yes" if r["up_to_date"] else "no (run `ctl auth enable`)")
                 for r in data["roles"]], title="Roles")


@user_app.command(name="create", epilog="Example:  ctl auth user create gw-1 --role gateway -o json > gw-1.json")
def user_create(
    name: Annotated[str, typer.Argument(help="The new etcd user's name.")],
    role: RoleOpt,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Create an etcd user for a gateway, planner, operator (admin) or harvester, with a random
    password that is printed once (store it in a Secret or a mode-600 file)."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    made = run_admin(config, lambda store: create_user(store, Keys(config.prefix), name, role))
    if output is OutputFormat.json:
        print_json(made)
        return
    print(f"user:     {made['user']}\nrole:     {made['role']}\npassword: {made['password']}")
    print("the password is shown only now", file=typer.get_text_stream("stderr"))


@user_app.command(name="delete", epilog="Example:  ctl auth user delete gw-1")
def user_delete(
    name: Annotated[str, typer.Argument(help="The etcd user to delete.")],
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Delete a service user; its tokens stop working at once (tenants: `ctl tenants delete`)."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    run_admin(config, lambda store: delete_user(store, name))
    if output is OutputFormat.json:
        print_json({"user": name, "deleted": True})
    else:
        print(f"deleted etcd user {name!r}")


@user_app.command(name="list", epilog="Example:  ctl auth user list -o json")
def user_list(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Every etcd user and its roles."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    users = run_admin(config, list_users)
    if output is OutputFormat.json:
        print_json(users)
        return
    print_table(["user", "roles"], [(u["user"], ",".join(u["roles"]) or "-") for u in users],
                title=f"Users ({len(users)})")

