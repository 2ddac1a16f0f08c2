"""SQL for ``custom_providers`` (upstreams a global admin adds). Writes send
``provider:<name>``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction

NOTIFY_KIND = "provider"

_COLUMNS = "name, display_name, dialect, base_url, auth, models_path, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class CustomProviderRow:
    name: str
    display_name: str
    dialect: str
    base_url: str
    auth: str
    models_path: str
    created_at: datetime
    updated_at: datetime


class ProviderGone(Exception):
    """The custom provider a key or route names was deleted meanwhile."""


class CustomProviderStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> list[CustomProviderRow]:
        rows = await self._db.runQuery(
            "load_custom_providers", f"SELECT {_COLUMNS} FROM custom_providers ORDER BY name"
        )
        return [CustomProviderRow(*r) for r in rows]

    async def upsert(
        self,
        name: str,
        display_name: str,
        dialect: str,
        base_url: str,
        auth: str,
        models_path: str,
        *,
        replace: bool = True,
    ) -> tuple[CustomProviderRow, bool] | None:
        """Create or replace; returns the row and whether it is new. With
        ``replace`` False, only create: None when the name is taken (decided
        by the database, so concurrent creations make exactly one)."""
        on_conflict = (
            "DO UPDATE SET "
            "display_name = EXCLUDED.display_name, dialect = EXCLUDED.dialect, "
            "base_url = EXCLUDED.base_url, auth = EXCLUDED.auth, "
            "models_path = EXCLUDED.models_path"
            if replace
            else "DO NOTHING"
        )

        async def txn(t: Transaction) -> tuple[CustomProviderRow, bool] | None:
            row = await t.fetchone(
                "INSERT INTO custom_providers (name, display_name, dialect, base_url, auth, "
                f"models_path) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) {on_conflict} "
                f"RETURNING {_COLUMNS}, (xmax = 0)",
                (name, display_name, dialect, base_url, auth, models_path),
            )
            if row is None:
                return None
            t.notify(NOTIFY_KIND, name)
            return CustomProviderRow(*row[:-1]), bool(row[-1])

        return await self._db.runInteraction("upsert_custom_provider", txn)

    async def delete(self, name: str) -> tuple[int, int] | None:
        """Delete the provider unless a provider key or a route names it:
        None when there is no such provider, ``(0, 0)`` when deleted, else
        the (keys, routes) that still name it. The row is locked first, so a
        key or route being stored for it (they hold it, FOR KEY SHARE) is
        waited for and then counted."""

        async def txn(t: Transaction) -> tuple[int, int] | None:
            row = await t.fetchone(
                "SELECT 1 FROM custom_providers WHERE name = %s FOR UPDATE", (name,)
            )
            if row is None:
                return None
            keys, routes = await t.fetchone(
                "SELECT (SELECT count(*) FROM provider_keys WHERE provider = %(n)s), "
                "(SELECT count(*) FROM org_routes WHERE targets @> "
                "jsonb_build_array(jsonb_build_object('provider', %(n)s::text)))",
                {"n": name},
            )
            if keys or routes:
                return int(keys), int(routes)
            await t.execute("DELETE FROM custom_providers WHERE name = %s", (name,))
            t.notify(NOTIFY_KIND, name)
            return 0, 0

        return await self._db.runInteraction("delete_custom_provider", txn)
