"""Helpers for the limits tests: limits managers on a real PostgreSQL whose
time is a ``task.Clock`` (windows, rollover, retry-after) while the
database work runs on the real reactor."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import psycopg2
from twisted.internet.task import Clock

from lectr.db.database import Database
from lectr.limits import Admission, LimitsManager, Refusal
from lectr.managers.orgs import OrgManager
from lectr.metrics import Registry
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.limits import LimitStore
from lectr.storage.orgs import OrgStore

# half a minute before a new UTC day and a new calendar month
T0 = datetime(2026, 3, 31, 23, 59, 30, tzinfo=UTC).timestamp()


class LimitsEnv:
    def __init__(self, database: Database, db_url: str) -> None:
        self.database = database
        self.db_url = db_url
        self.clock = Clock()
        self.clock.advance(T0)
        self.orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
        self.managers: list[LimitsManager] = []
        self.org_id = ""
        self.key_id = ""

    async def setup(self) -> None:
        org, issued = await self.orgs.create_org("Acme")
        self.org_id, self.key_id = org.id, issued.key.id

    async def new_key(self) -> str:
        issued = await self.orgs.create_key(self.org_id, "another")
        return issued.key.id

    async def manager(self, database: Database | None = None, **kw) -> LimitsManager:
        kw.setdefault("metrics", Registry())
        m = LimitsManager(LimitStore(database or self.database), reactor=self.clock, **kw)
        await m.start()
        self.managers.append(m)
        return m

    def crash(self, m: LimitsManager) -> None:
        """The node stops dead: no more rounds, nothing handed back."""
        m._stopping = True
        m._loop.stop()
        if m._scheduled is not None and m._scheduled.active():
            m._scheduled.cancel()
        self.managers.remove(m)

    async def sync(self) -> None:
        for m in self.managers:
            await m.sync()

    async def advance(self, seconds: float) -> None:
        """Move time on, with no lease round in flight meanwhile (a round's
        watchdog lives on the clock too)."""
        await self.sync()
        self.clock.advance(seconds)
        await self.sync()

    async def close(self) -> None:
        for m in self.managers:
            await m.stop()

    def counter(self, scope_id: str, metric: str) -> list[tuple]:
        """(window_start, used, spent) rows of a scope's counter."""
        return sql(
            self.db_url,
            "SELECT window_start, used, spent FROM limit_counters "
            "WHERE scope_id = %s AND metric = %s ORDER BY window_start",
            (scope_id, metric),
        )


def sql(db_url: str, query: str, args=()) -> list[tuple]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.commit()
        conn.close()


def admitted(result) -> Admission:
    assert isinstance(result, Admission), result
    return result


def refused(result) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def headers(result) -> dict[bytes, bytes]:
    return dict(result.headers)


def usd(text: str) -> Decimal:
    return Decimal(text)
