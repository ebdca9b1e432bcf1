"""`ctl tenants create | list | delete`: the groups of researchers whose agents add capacity.

A tenant is an etcd role and user, both ``tenant-<name>``, that may write only
``tenants/<name>/`` (its nodes and instances) and read what its agents need (controlplane/roles.py).
Gateways route a model to a tenant's instances only when the model's ``servers`` list the tenant,
or list nobody (community-served). Run as etcd's root, like `ctl auth`.

    create  ──► role + user tenant-<name> ──► print the password once (agents read it from a file)
    delete  ──► user, role ──► revoke its records' leases ──► delete its records: its instances
                leave routing as soon as gateways see the deletes
"""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.authadmin import create_tenant, delete_tenant, list_tenants
from controlplane.cli.auth import root_config, run_admin
from controlplane.cli.common import (
    CaOpt,
    CertOpt,
    EtcdOpt,
    KeyOpt,
    OutputFormat,
    OutputOpt,
    PasswordFileOpt,
    PrefixOpt,
    UserOpt,
    warn,
)
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.keys import Keys

tenants_app = typer.Typer(help="Tenants: who may register agents, each writing only its own records.",
                          no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")

NameArg = Annotated[str, typer.Argument(help="Tenant name: 1-32 lower-case letters, digits and '-'.")]


@tenants_app.command(epilog="Example:  ctl tenants create nlp-lab -o json | jq -r .password > nlp-lab.pw "
                            "&& chmod 600 nlp-lab.pw")
def create(
    name: NameArg,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Create tenant NAME: etcd role and user tenant-NAME, with a random password printed once.

    Its agents run with --etcd-user tenant-NAME and the password in a file (ETCD_PASSWORD_FILE in
    the sbatch templates). Put NAME into a model's `servers` to let it serve a restricted model.
    """
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    made = run_admin(config, lambda store: create_tenant(store, Keys(config.prefix), name))
    if output is OutputFormat.json:
        print_json(made)
        return
    print(f"tenant:   {made['tenant']}\nuser:     {made['user']}\npassword: {made['password']}")
    print("the password is shown only now", file=typer.get_text_stream("stderr"))


@tenants_app.command(name="list", epilog="Example:  ctl tenants list   |   ctl tenants list -o json")
def list_(
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Tenants with their etcd role and user and how many nodes and instances they have registered
    (``legacy``: records of the old key layout)."""
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    tenants, warnings = run_admin(config, lambda store: list_tenants(store, Keys(config.prefix)))
    warn(warnings)
    if output is OutputFormat.json:
        print_json(tenants)
        return
    print_table(["tenant", "user", "role", "nodes", "instances"],
                [(t["tenant"], t["user"] or "-", t["role"] or "-", t["nodes"], t["instances"]) for t in tenants],
                title=f"Tenants ({len(tenants)})")


@tenants_app.command(epilog="Example:  ctl tenants delete nlp-lab")
def delete(
    name: NameArg,
    etcd: EtcdOpt = None, etcd_prefix: PrefixOpt = None, etcd_cacert: CaOpt = None, etcd_cert: CertOpt = None,
    etcd_key: KeyOpt = None, etcd_user: UserOpt = None, etcd_password_file: PasswordFileOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Revoke tenant NAME: delete its etcd user and role (its tokens stop working at once), revoke
    the leases of its records and delete them, so its instances leave every gateway's routing.

    Its agents keep running until their jobs end but can no longer write anything.
    """
    config = root_config(etcd, etcd_prefix, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file)
    report = run_admin(config, lambda store: delete_tenant(store, Keys(config.prefix), name))
    if output is OutputFormat.json:
        print_json(report)
        return
    print(f"tenant {name!r} revoked: user {'deleted' if report['user_deleted'] else 'absent'}, role "
          f"{'deleted' if report['role_deleted'] else 'absent'}, {report['leases_revoked']} lease(s) revoked, "
          f"{report['records_deleted']} record(s), {report['desired_deleted']} desired assignment(s) and "
          f"{report['controls_deleted']} drain control(s) deleted")
