"""etcd's user, role and auth administration, typed (what `ctl auth` and `ctl tenants` call).

Every call needs etcd's root role once auth is on (etcd allows them to anyone while it is off,
which is how the first root user is made). Names and permissions come from
controlplane/roles.py; this module only talks to etcd.
"""

from __future__ import annotations

from etcd3aio.auth import AuthService, PermissionType

from controlplane.keys import Keys
from controlplane.roles import Access, Perm, perm_changes
from controlplane.store.client import EtcdStore
from controlplane.store.errors import StoreAuthError, StoreError

_TO_ETCD = {Access.read: PermissionType.READ, Access.write: PermissionType.WRITE,
            Access.readwrite: PermissionType.READWRITE}
_FROM_ETCD = {int(v): k for k, v in _TO_ETCD.items()}


class EtcdAdmin:
    """Users, roles, permissions and the auth switch of the etcd behind ``store``."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store

    @property
    def _auth(self) -> AuthService:
        auth = self.store.client.auth
        if auth is None:
            raise StoreError("store is not connected")
        return auth

    async def auth_enabled(self) -> bool:
        """Whether etcd requires authentication (asked without credentials: etcd 3.4 has no
        AuthStatus call, so the answer is whether an anonymous read is refused)."""
        anonymous = EtcdStore(self.store.config.with_credentials(None, None))
        await anonymous.connect()
        try:
            await anonymous.revision()
        except StoreAuthError:
            return True
        finally:
            await anonymous.close()
        return False

    async def enable(self) -> None:
        """Turn authentication on (etcd refuses unless a user ``root`` with the root role exists)."""
        await self.store._call("enable auth", lambda: self._auth.auth_enable(timeout=self.store.config.timeout_s))

    async def disable(self) -> None:
        """Turn authentication off (root only)."""
        await self.store._call("disable auth", lambda: self._auth.auth_disable(timeout=self.store.config.timeout_s))

    # -- users ---------------------------------------------------------------------------------

    async def users(self) -> list[str]:
        """Every etcd user, sorted."""
        resp = await self.store._call("list users", lambda: self._auth.user_list(timeout=self.store.config.timeout_s))
        return sorted(resp.users)

    async def user_roles(self, user: str) -> list[str] | None:
        """The roles of ``user``; None when there is no such user."""
        if user not in await self.users():
            return None
        resp = await self.store._call(f"get user {user}", lambda: self._auth.user_get(
            user, timeout=self.store.config.timeout_s))
        return sorted(resp.roles)

    async def add_user(self, user: str, password: str) -> None:
        """Create ``user`` with ``password``."""
        await self.store._call(f"add user {user}", lambda: self._auth.user_add(
            user, password, timeout=self.store.config.timeout_s))

    async def set_password(self, user: str, password: str) -> None:
        """Change the password of ``user`` (its tokens stay valid until they expire)."""
        await self.store._call(f"change password of {user}", lambda: self._auth.user_change_password(
            user, password, timeout=self.store.config.timeout_s))

    async def delete_user(self, user: str) -> None:
        """Delete ``user``: etcd invalidates its tokens at once (open watches keep running)."""
        await self.store._call(f"delete user {user}", lambda: self._auth.user_delete(
            user, timeout=self.store.config.timeout_s))

    async def grant_role(self, user: str, role: str) -> None:
        """Give ``user`` the role ``role`` (idempotent)."""
        await self.store._call(f"grant role {role} to {user}", lambda: self._auth.user_grant_role(
            user, role, timeout=self.store.config.timeout_s))

    # -- roles ---------------------------------------------------------------------------------

    async def roles(self) -> list[str]:
        """Every etcd role, sorted."""
        resp = await self.store._call("list roles", lambda: self._auth.role_list(timeout=self.store.config.timeout_s))
        return sorted(resp.roles)

    async def add_role(self, role: str) -> None:
        """Create an empty role."""
        await self.store._call(f"add role {role}", lambda: self._auth.role_add(
            role, timeout=self.store.config.timeout_s))

    async def delete_role(self, role: str) -> None:
        """Delete a role (users that had it lose its permissions at once)."""
        await self.store._call(f"delete role {role}", lambda: self._auth.role_delete(
            role, timeout=self.store.config.timeout_s))

    async def role_perms(self, role: str) -> tuple[Perm, ...]:
        """The permissions of ``role``."""
        resp = await self.store._call(f"get role {role}", lambda: self._auth.role_get(
            role, timeout=self.store.config.timeout_s))
        return tuple(sorted(Perm(p.key.decode("latin-1"), p.range_end.decode("latin-1"), _FROM_ETCD[int(p.permType)])
                            for p in resp.perm))

    async def sync_role(self, keys: Keys, role: str, wanted: tuple[Perm, ...]) -> tuple[list[Perm], list[Perm]]:
        """Create ``role`` if needed and make its permissions on this pool exactly ``wanted``
        (permissions on other prefixes are left alone); returns (granted, revoked)."""
        if role not in await self.roles():
            await self.add_role(role)
        grant, revoke = perm_changes(keys, await self.role_perms(role), wanted)
        for p in revoke:
            await self.store._call(f"revoke {p.describe(keys.prefix)} from {role}", lambda p=p: (  # type: ignore[misc]
                self._auth.role_revoke_permission(role, p.key.encode("latin-1"),
                                                  p.range_end.encode("latin-1") if p.range_end else None,
                                                  timeout=self.store.config.timeout_s)))
        for p in grant:
            await self.store._call(f"grant {p.describe(keys.prefix)} to {role}", lambda p=p: (  # type: ignore[misc]
                self._auth.role_grant_permission(role, p.key.encode("latin-1"),
                                                 p.range_end.encode("latin-1") if p.range_end else None,
                                                 perm_type=_TO_ETCD[p.access], timeout=self.store.config.timeout_s)))
        return grant, revoke

    # -- leases --------------------------------------------------------------------------------

    async def revoke_leases(self, lease_ids: set[int]) -> int:
        """Revoke every lease in ``lease_ids`` (their keys go with them); returns how many were
        still there."""
        revoked = 0
        for lease_id in sorted(lease_ids):
            try:
                await self.store.revoke_lease(lease_id)
            except StoreError as exc:
                if "lease not found" in str(exc) or "expired or was revoked" in str(exc):
                    continue
                raise
            revoked += 1
        return revoked

