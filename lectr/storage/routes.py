"""SQL for ``org_routes`` (an org's virtual models). Writes send
``routes:<org id>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg2.extras import Json

from lectr.db.database import Database, Transaction
from lectr.storage.custom_providers import ProviderGone

NOTIFY_KIND = "routes"

_COLUMNS = (
    "org_id, name, targets, strategy, retry_on, max_attempts, attempt_timeout, "
    "created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class RouteRow:
    org_id: str
    name: str
    targets: list  # [{"provider", "model", "weight"}]
    strategy: str
    retry_on: tuple[str, ...]
    max_attempts: int
    attempt_timeout: float | None
    created_at: datetime
    updated_at: datetime


def _row(r: tuple) -> RouteRow:
    org_id, name, targets, strategy, retry_on, max_attempts, timeout, created, updated = r
    return RouteRow(
        org_id, name, targets, strategy, tuple(retry_on), max_attempts, timeout, created, updated
    )


class TooManyRoutes(Exception):
    """The org already has ``max_routes`` routes (a new name is refused)."""


class RouteStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def org_exists(self, org_id: str) -> bool:
        rows = await self._db.runQuery(
            "routes_org_exists", "SELECT 1 FROM organizations WHERE id = %s", (org_id,)
        )
        return bool(rows)

    async def load(self, org_ids: list[str] | None = None) -> list[RouteRow]:
        if org_ids is None:
            rows = await self._db.runQuery(
                "load_routes", f"SELECT {_COLUMNS} FROM org_routes ORDER BY org_id, name"
            )
        else:
            rows = await self._db.runQuery(
                "load_org_routes",
                f"SELECT {_COLUMNS} FROM org_routes WHERE org_id = ANY(%s::uuid[]) "
                "ORDER BY org_id, name",
                (list(org_ids),),
            )
        return [_row(r) for r in rows]

    async def upsert(
        self,
        org_id: str,
        name: str,
        *,
        targets: list[dict],
        strategy: str,
        retry_on: list[str],
        max_attempts: int,
        attempt_timeout: float | None,
        max_routes: int | None = None,
        custom: Sequence[str] = (),
    ) -> tuple[RouteRow, bool] | None:
        """Create or replace a route; None when the org does not exist,
        TooManyRoutes when ``name`` is new and the org already has
        ``max_routes`` (None: no cap). ``custom``: the custom providers its targets name,
        whose rows are held while the route is stored (a delete of one
        waits, then sees the route); ProviderGone when one was deleted
        meanwhile."""

        async def txn(t: Transaction) -> tuple[RouteRow, bool] | None:
            # FOR NO KEY UPDATE: route writes of one org (any node) take
            # turns from here to commit, so the count below sees every route
            # committed before and none can be added after it - the cap
            # holds however many run at once. Foreign-key checks (FOR KEY
            # SHARE: request logs, keys) are not held up by this lock.
            exists = await t.fetchone(
                "SELECT 1 FROM organizations WHERE id = %s FOR NO KEY UPDATE", (org_id,)
            )
            if exists is None:
                return None
            if max_routes is not None:
                # (a new statement: under READ COMMITTED it sees what the
                # writers the lock waited for committed)
                count, present = await t.fetchone(
                    "SELECT count(*), coalesce(bool_or(name = %s), false) FROM org_routes "
                    "WHERE org_id = %s",
                    (name, org_id),
                )
                if not present and count >= max_routes:
                    raise TooManyRoutes()
            if custom:
                wanted = sorted(set(custom))
                held = await t.fetchall(
                    "SELECT name FROM custom_providers WHERE name = ANY(%s) FOR KEY SHARE",
                    (wanted,),
                )
                if len(held) < len(wanted):
                    gone = set(wanted) - {r[0] for r in held}
                    raise ProviderGone(", ".join(sorted(gone)))
            row = await t.fetchone(
                "INSERT INTO org_routes (org_id, name, targets, strategy, retry_on, max_attempts, "
                "attempt_timeout) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (org_id, name) DO UPDATE SET targets = EXCLUDED.targets, "
                "strategy = EXCLUDED.strategy, retry_on = EXCLUDED.retry_on, "
                "max_attempts = EXCLUDED.max_attempts, "
                f"attempt_timeout = EXCLUDED.attempt_timeout RETURNING {_COLUMNS}, (xmax = 0)",
                (
                    org_id,
                    name,
                    Json(targets),
                    strategy,
                    list(retry_on),
                    max_attempts,
                    attempt_timeout,
                ),
            )
            t.notify(NOTIFY_KIND, org_id)
            return _row(row[:-1]), bool(row[-1])

        return await self._db.runInteraction("upsert_route", txn)

    async def delete(self, org_id: str, name: str) -> bool:
        async def txn(t: Transaction) -> bool:
            deleted = await t.execute(
                "DELETE FROM org_routes WHERE org_id = %s AND name = %s", (org_id, name)
            )
            if deleted:
                t.notify(NOTIFY_KIND, org_id)
            return bool(deleted)

        return await self._db.runInteraction("delete_route", txn)
