"""Admin identities, org memberships, and every authorization decision of
the admin API.

Authorization is declarative: each admin route names one :class:`Permission`
and :meth:`UserManager.authorize` decides, from :data:`ROLE_PERMISSIONS`,
whether the caller holds it:

- ``PUBLIC`` — anybody; ``AUTHENTICATED`` — any verified caller;
- ``GLOBAL_ADMIN`` — the admin token or a user with ``is_admin``;
- ``ORG_READ`` / ``ORG_WRITE`` / ``ORG_OWNER`` — a role in the org named by
  the route. Global admins hold all three in every org.

An org the caller does not belong to answers 404, exactly like one that does
not exist, so its existence is not disclosed; a member whose role lacks the
permission gets 403.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.logger import Logger

from lectr.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from lectr.storage.members import (
    ROLES,
    LastOwner,
    Member,
    Membership,
    MemberStore,
    OrgMissing,
)
from lectr.storage.users import User, UserStore
from lectr.util.validate import parse_uuid

__all__ = [
    "ROLES",
    "ROLE_PERMISSIONS",
    "Access",
    "Permission",
    "Principal",
    "UserManager",
]


class Permission(enum.Enum):
    PUBLIC = "public"
    AUTHENTICATED = "authenticated"
    GLOBAL_ADMIN = "global_admin"
    ORG_READ = "org_read"
    ORG_WRITE = "org_write"
    ORG_OWNER = "org_owner"

    @property
    def org_scoped(self) -> bool:
        return self in _ORG_SCOPED


_ORG_SCOPED = frozenset({Permission.ORG_READ, Permission.ORG_WRITE, Permission.ORG_OWNER})

#: What each org role may do. The one table every role check reads.
ROLE_PERMISSIONS: Mapping[str, frozenset[Permission]] = {
    "owner": frozenset({Permission.ORG_READ, Permission.ORG_WRITE, Permission.ORG_OWNER}),
    "admin": frozenset({Permission.ORG_READ, Permission.ORG_WRITE}),
    "member": frozenset({Permission.ORG_READ}),
}

_EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")
MAX_SUBJECT_LEN = 255
MAX_EMAIL_LEN = 320


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the static admin token, or a user identity."""

    user: User | None  # None for the admin token

    @classmethod
    def admin_token(cls) -> Principal:
        return cls(user=None)

    @property
    def kind(self) -> str:
        return "token" if self.user is None else "user"

    @property
    def is_admin(self) -> bool:
        return self.user is None or self.user.is_admin

    @property
    def user_id(self) -> str | None:
        return self.user.id if self.user is not None else None

    def describe(self) -> str:
        """For log lines: never a token, only which identity."""
        return "admin-token" if self.user is None else f"user:{self.user.id}"


@dataclass(frozen=True, slots=True)
class Access:
    """A granted permission: who, in which org (canonical id), with which
    role (None for a global admin who is not a member)."""

    principal: Principal | None
    permission: Permission
    org_id: str | None = None
    role: str | None = None


def clean_subject(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("subject must be a non-empty string")
    subject = value.strip()
    # (the rule JWTVerifier applies to a token's sub: an identity made for a
    # subject no token can carry could never sign in)
    if len(subject) > MAX_SUBJECT_LEN or any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject):
        raise BadRequest(f"subject must be at most {MAX_SUBJECT_LEN} printable characters")
    return subject


def clean_email(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("email must be a string")
    email = value.strip()
    if len(email) > MAX_EMAIL_LEN or not _EMAIL_RE.fullmatch(email):
        raise BadRequest("email is not a valid address")
    # (a token's claim is any JSON string: no control character, nor an
    # unpaired surrogate that PostgreSQL could not store)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in email):
        raise BadRequest("email is not a valid address")
    return email


def clean_role(value: object) -> str:
    if value not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    return value


class UserManager:
    _log = Logger()

    def __init__(self, users: UserStore, members: MemberStore) -> None:
        self._users = users
        self._members = members

    # --- identities ----------------------------------------------------------

    async def identify(
        self, subject: str, email: str | None, *, email_verified: bool = False
    ) -> Principal:
        """The principal behind a verified token; its identity is upserted
        (created on first sight, email and its verified flag kept current:
        both come from the same token)."""
        subject = clean_subject(subject)
        if email is not None:
            try:
                email = clean_email(email)
            except BadRequest:
                email = None  # an odd claim must not lock a user out
        user = await self._users.record_seen(
            subject, email, email_verified=email is not None and email_verified
        )
        return Principal(user=user)

    async def list_users(self) -> list[User]:
        return await self._users.list()

    async def set_admin(self, user_id: object, is_admin: bool) -> User:
        user = await self._users.set_admin(parse_uuid(user_id, "user"), bool(is_admin))
        if user is None:
            raise NotFound("user not found")
        self._log.info(
            "global admin rights {change} for {user_id}",
            change="granted" if is_admin else "revoked",
            user_id=user.id,
        )
        return user

    # --- authorization -------------------------------------------------------

    async def authorize(
        self, principal: Principal | None, permission: Permission, org_id: object = None
    ) -> Access:
        """Decide whether ``principal`` holds ``permission`` (in ``org_id``
        for org-scoped permissions). Raises Unauthorized, Forbidden or
        NotFound."""
        if permission is Permission.PUBLIC:
            return Access(principal, permission) if principal else _PUBLIC_ACCESS
        if principal is None:
            raise Unauthorized("authentication required")
        if permission is Permission.AUTHENTICATED:
            return Access(principal, permission)
        if permission is Permission.GLOBAL_ADMIN:
            if not principal.is_admin:
                raise Forbidden("this requires global admin rights")
            return Access(principal, permission)

        org = parse_uuid(org_id, "organization")
        access = await self._members.access(org, principal.user_id)
        if not access.exists or (access.role is None and not principal.is_admin):
            raise NotFound("organization not found")
        if not principal.is_admin and permission not in ROLE_PERMISSIONS[access.role]:
            raise Forbidden(f"your role in this organization ({access.role}) does not allow this")
        return Access(principal, permission, org_id=org, role=access.role)

    async def memberships(self, principal: Principal) -> list[Membership]:
        if principal.user_id is None:
            return []
        return await self._members.memberships_of(principal.user_id)

    async def visible_orgs(self, principal: Principal) -> dict[str, str] | None:
        """The orgs ``principal`` may see, id → role; None means all of
        them (global admins)."""
        if principal.is_admin:
            return None
        return {m.org_id: m.role for m in await self.memberships(principal)}

    async def roles(self, principal: Principal) -> dict[str, str]:
        """id → role of every org ``principal`` belongs to."""
        return {m.org_id: m.role for m in await self.memberships(principal)}

    # --- members ---------------------------------------------------------------

    async def list_members(self, org_id: str) -> list[Member]:
        return await self._members.list(parse_uuid(org_id, "organization"))

    async def resolve_user(
        self, *, user_id: object = None, email: object = None, subject: object = None
    ) -> User:
        """The identity named by exactly one of ``user_id``, ``email``
        (of a user who has signed in) or ``subject`` (created if unseen)."""
        given = [n for n, v in (("user_id", user_id), ("email", email), ("subject", subject)) if v]
        if len(given) != 1:
            raise BadRequest("name the user with exactly one of user_id, email or subject")
        if given == ["user_id"]:
            user = await self._users.get(parse_uuid(user_id, "user"))
            if user is None:
                raise NotFound("user not found")
            return user
        if given == ["email"]:
            # Only an address the identity provider verified names a user:
            # anyone can put someone else's address in an unverified profile.
            found = await self._users.find_by_email(clean_email(email))
            verified = [u for u in found if u.email_verified]
            if len(verified) > 1:
                raise Conflict(
                    "several users have that verified email; use their user_id or subject",
                    code="ambiguous_email",
                )
            if verified:
                return verified[0]
            if found:
                raise Conflict(
                    "a user with that email has signed in, but their identity provider has not "
                    "verified the address (email_verified), so it cannot name them; use their "
                    "user_id or subject",
                    code="email_not_verified",
                )
            raise NotFound("no user with that email has signed in yet; use their subject")
        return await self._users.ensure(clean_subject(subject))

    async def put_member(self, org_id: str, user: User, role: object) -> tuple[Member, bool]:
        """Add ``user`` to the org with ``role``, or change their role.
        Returns the membership and whether it is new. 409 when it would
        demote the org's last owner."""
        role = clean_role(role)
        try:
            member, created = await self._members.put(
                parse_uuid(org_id, "organization"), user.id, role
            )
        except OrgMissing:
            raise NotFound("organization not found") from None
        except LastOwner:
            raise Conflict(
                "this is the organization's last owner; make someone else owner first",
                code="last_owner",
            ) from None
        self._log.info(
            "{change} member {user_id} of org {org_id} as {role}",
            change="added" if created else "updated",
            user_id=user.id,
            org_id=member.org_id,
            role=role,
        )
        return member, created

    async def remove_member(self, org_id: str, user_id: object) -> None:
        org = parse_uuid(org_id, "organization")
        user = parse_uuid(user_id, "member")
        try:
            removed = await self._members.remove(org, user)
        except OrgMissing:
            raise NotFound("organization not found") from None
        except LastOwner:
            raise Conflict(
                "this is the organization's last owner; make someone else owner first",
                code="last_owner",
            ) from None
        if not removed:
            raise NotFound("member not found")
        self._log.info("removed member {user_id} from org {org_id}", user_id=user, org_id=org)


_PUBLIC_ACCESS = Access(None, Permission.PUBLIC)
