"""SQL for ``org_members``: who belongs to which organization, with which
role (``owner``, ``admin`` or ``member``).

Membership changes lock the organization's row first, so concurrent changes
to one org's members are serialized and the "an org keeps at least one owner"
rule holds even when two owners demote each other at the same moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction

ROLES = ("owner", "admin", "member")

_MEMBER_SELECT = (
    "SELECT m.org_id, m.user_id, m.role, u.auth0_user_id, u.email, m.created_at, m.updated_at "
    "FROM org_members m JOIN user_identities u ON u.id = m.user_id "
)


@dataclass(frozen=True, slots=True)
class Member:
    org_id: str
    user_id: str
    role: str
    subject: str
    email: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Membership:
    """One of a user's organizations, as seen from the user."""

    org_id: str
    org_name: str
    role: str


@dataclass(frozen=True, slots=True)
class OrgAccess:
    """Whether an org exists, and the user's role in it (None: not a member)."""

    exists: bool
    role: str | None


class LastOwner(Exception):
    """The change would leave the organization without an owner."""


class OrgMissing(Exception):
    """The organization does not exist (any more)."""


def _member(row: tuple) -> Member:
    return Member(*row)


async def insert_member_txn(t: Transaction, org_id: str, user_id: str, role: str) -> None:
    """Add a membership inside a caller's transaction (e.g. the owner of an
    org being created)."""
    await t.execute(
        "INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, %s)",
        (org_id, user_id, role),
    )


async def _lock_org(t: Transaction, org_id: str) -> None:
    if await t.fetchone("SELECT 1 FROM organizations WHERE id = %s FOR UPDATE", (org_id,)) is None:
        raise OrgMissing()


async def _owners_besides(t: Transaction, org_id: str, user_id: str) -> int:
    row = await t.fetchone(
        "SELECT count(*) FROM org_members WHERE org_id = %s AND role = 'owner' AND user_id <> %s",
        (org_id, user_id),
    )
    return row[0]


class MemberStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def access(self, org_id: str, user_id: str | None) -> OrgAccess:
        """One query: does the org exist, and what is ``user_id``'s role?"""
        rows = await self._db.runQuery(
            "org_access",
            "SELECT m.role FROM organizations o "
            "LEFT JOIN org_members m ON m.org_id = o.id AND m.user_id = %s "
            "WHERE o.id = %s",
            (user_id, org_id),
        )
        if not rows:
            return OrgAccess(exists=False, role=None)
        return OrgAccess(exists=True, role=rows[0][0])

    async def memberships_of(self, user_id: str) -> list[Membership]:
        rows = await self._db.runQuery(
            "memberships_of",
            "SELECT o.id, o.name, m.role FROM org_members m "
            "JOIN organizations o ON o.id = m.org_id "
            "WHERE m.user_id = %s ORDER BY o.created_at, o.id",
            (user_id,),
        )
        return [Membership(*r) for r in rows]

    async def list(self, org_id: str) -> list[Member]:
        rows = await self._db.runQuery(
            "list_members",
            _MEMBER_SELECT + "WHERE m.org_id = %s ORDER BY m.created_at, m.user_id",
            (org_id,),
        )
        return [_member(r) for r in rows]

    async def put(self, org_id: str, user_id: str, role: str) -> tuple[Member, bool]:
        """Add ``user_id`` with ``role``, or change their role. Returns the
        membership and whether it is new. Raises OrgMissing, or LastOwner
        when this would demote the org's only owner."""

        async def txn(t: Transaction) -> tuple[Member, bool]:
            await _lock_org(t, org_id)
            current = await t.fetchone(
                "SELECT role FROM org_members WHERE org_id = %s AND user_id = %s",
                (org_id, user_id),
            )
            if current is None:
                await insert_member_txn(t, org_id, user_id, role)
            elif current[0] != role:
                if current[0] == "owner" and await _owners_besides(t, org_id, user_id) == 0:
                    raise LastOwner()
                await t.execute(
                    "UPDATE org_members SET role = %s WHERE org_id = %s AND user_id = %s",
                    (role, org_id, user_id),
                )
            row = await t.fetchone(
                _MEMBER_SELECT + "WHERE m.org_id = %s AND m.user_id = %s", (org_id, user_id)
            )
            return _member(row), current is None

        return await self._db.runInteraction("put_member", txn)

    async def remove(self, org_id: str, user_id: str) -> bool:
        """Remove a membership; False when there was none. Raises OrgMissing,
        or LastOwner when ``user_id`` is the org's only owner."""

        async def txn(t: Transaction) -> bool:
            await _lock_org(t, org_id)
            current = await t.fetchone(
                "SELECT role FROM org_members WHERE org_id = %s AND user_id = %s",
                (org_id, user_id),
            )
            if current is None:
                return False
            if current[0] == "owner" and await _owners_besides(t, org_id, user_id) == 0:
                raise LastOwner()
            await t.execute(
                "DELETE FROM org_members WHERE org_id = %s AND user_id = %s", (org_id, user_id)
            )
            return True

        return await self._db.runInteraction("remove_member", txn)
