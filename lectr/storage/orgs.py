"""SQL for ``organizations``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg2
import psycopg2.errors

from lectr.db.database import Database, Transaction
from lectr.storage.api_keys import ApiKey, NewKey, insert_key_txn
from lectr.storage.members import insert_member_txn

_COLUMNS = "id, name, enabled, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class Org:
    id: str
    name: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


def _org(row: tuple) -> Org:
    return Org(*row)


class NameTaken(Exception):
    """Another organization has this name (compared case-insensitively)."""


_NAME_INDEX = "organizations_name_lower_key"


def _is_name_clash(error: psycopg2.Error) -> bool:
    return isinstance(error, psycopg2.errors.UniqueViolation) and (
        getattr(error.diag, "constraint_name", None) == _NAME_INDEX
    )


class OrgStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, name: str, first_key: NewKey, owner_id: str | None = None
    ) -> tuple[Org, ApiKey]:
        """Create an org with its first key and, when ``owner_id`` is given,
        its first owner, in one transaction."""

        async def txn(t: Transaction) -> tuple[Org, ApiKey]:
            row = await t.fetchone(
                f"INSERT INTO organizations (name) VALUES (%s) "
                f"ON CONFLICT ((lower(name))) DO NOTHING RETURNING {_COLUMNS}",
                (name,),
            )
            if row is None:
                raise NameTaken()
            org = _org(row)
            key = await insert_key_txn(t, org.id, first_key)
            if owner_id is not None:
                await insert_member_txn(t, org.id, owner_id, "owner")
            t.notify("org", org.id)
            return org, key

        return await self._db.runInteraction("create_org", txn)

    async def get(self, org_id: str) -> Org | None:
        rows = await self._db.runQuery(
            "get_org", f"SELECT {_COLUMNS} FROM organizations WHERE id = %s", (org_id,)
        )
        return _org(rows[0]) if rows else None

    async def list(self, only_ids: list[str] | None = None) -> list[Org]:
        if only_ids is None:
            rows = await self._db.runQuery(
                "list_orgs", f"SELECT {_COLUMNS} FROM organizations ORDER BY created_at, id"
            )
        else:
            rows = await self._db.runQuery(
                "list_orgs_by_id",
                f"SELECT {_COLUMNS} FROM organizations WHERE id = ANY(%s::uuid[]) "
                "ORDER BY created_at, id",
                (list(only_ids),),
            )
        return [_org(r) for r in rows]

    async def rename(self, org_id: str, name: str) -> Org | None:
        """None when the org does not exist; raises NameTaken."""

        async def txn(t: Transaction) -> Org | None:
            try:
                row = await t.fetchone(
                    f"UPDATE organizations SET name = %s WHERE id = %s RETURNING {_COLUMNS}",
                    (name, org_id),
                )
            except psycopg2.Error as e:
                if _is_name_clash(e):
                    raise NameTaken() from None
                raise
            if row is not None:
                t.notify("org", org_id)
            return _org(row) if row else None

        return await self._db.runInteraction("rename_org", txn)

    async def set_enabled(self, org_id: str, enabled: bool) -> Org | None:
        async def txn(t: Transaction) -> Org | None:
            row = await t.fetchone(
                f"UPDATE organizations SET enabled = %s WHERE id = %s RETURNING {_COLUMNS}",
                (enabled, org_id),
            )
            if row is not None:
                t.notify("org", org_id)
            return _org(row) if row else None

        return await self._db.runInteraction("set_org_enabled", txn)

    async def delete(self, org_id: str) -> bool:
        """Delete an org, its keys, provider keys, settings, memberships
        (by cascade) and its request logs."""

        async def txn(t: Transaction) -> bool:
            deleted = await t.execute("DELETE FROM organizations WHERE id = %s", (org_id,))
            if deleted:
                await t.execute("DELETE FROM request_logs WHERE org_id = %s", (org_id,))
                await t.execute("DELETE FROM usage_hourly WHERE org_id = %s", (org_id,))
                t.notify("org", org_id)
            return bool(deleted)

        return await self._db.runInteraction("delete_org", txn)
