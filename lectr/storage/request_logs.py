"""SQL for ``request_logs``: batched inserts and the read-back queries.

Writes are one multi-row ``INSERT … SELECT … FROM unnest(…)`` per batch
(txpostgres has neither ``executemany`` nor COPY), idempotent on
``request_id`` so a batch replayed from the spill journal never duplicates a
row. Reads are keyset-paginated on ``(created_at DESC, id DESC)`` and only
ever filter with parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction
from lectr.usage.model import UsageRecord

# "LECTRRET": one node at a time runs the retention deletes
_RETENTION_LOCK = int.from_bytes(b"LECTRRET", "big") & 0x7FFFFFFFFFFFFFFF

_INSERT_COLUMNS = (
    "request_id, created_at, org_id, key_id, provider, model, method, path, status, "
    "latency_ms, ttfb_ms, streamed, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, cache_creation_tokens, usage_source, error_type, "
    "route, provider_key_id, attempts, fallbacks"
)
_INSERT_SQL = (
    f"INSERT INTO request_logs ({_INSERT_COLUMNS}) "
    "SELECT * FROM unnest("
    "%s::uuid[], %s::timestamptz[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::smallint[], %s::float8[], %s::float8[], %s::bool[], "
    "%s::int[], %s::int[], %s::int[], %s::int[], %s::int[], %s::text[], %s::text[], "
    "%s::text[], %s::uuid[], %s::smallint[], %s::jsonb[]) "
    "ON CONFLICT (request_id) DO NOTHING"
)

_SELECT_COLUMNS = "id, " + _INSERT_COLUMNS


@dataclass(frozen=True, slots=True)
class RequestLog:
    id: int
    request_id: str
    created_at: datetime
    org_id: str
    key_id: str | None
    provider: str
    model: str | None
    method: str
    path: str
    status: int
    latency_ms: float
    ttfb_ms: float | None
    streamed: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    cache_creation_tokens: int | None
    usage_source: str
    error_type: str | None
    route: str | None = None
    provider_key_id: str | None = None
    attempts: int = 1
    fallbacks: list | None = None


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Optional conditions on a listing (each None: no condition)."""

    provider: str | None = None
    model: str | None = None
    key_id: str | None = None
    status_min: int | None = None  # inclusive
    status_max: int | None = None  # inclusive
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    key: object  # the model or provider (str, model may be None), or the UTC day (date)
    requests: int
    errors: int  # status >= 400
    unmetered: int  # usage_source = 'none'
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    cache_creation_tokens: int


# Group keys are chosen from this table, never from caller text.
_GROUP_KEYS = {
    "model": ("model", "requests DESC, key NULLS LAST"),
    "provider": ("provider", "requests DESC, key"),
    "key": ("key_id", "requests DESC, key NULLS LAST"),
    "day": ("(created_at AT TIME ZONE 'UTC')::date", "key"),
    "hour": ("date_trunc('hour', created_at AT TIME ZONE 'UTC')", "key"),
}
_TOTALS = (
    "count(*) AS requests, "
    "count(*) FILTER (WHERE status >= 400), "
    "count(*) FILTER (WHERE usage_source = 'none'), "
    "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
    "coalesce(sum(total_tokens), 0), coalesce(sum(cached_tokens), 0), "
    "coalesce(sum(cache_creation_tokens), 0)"
)


def _conditions(where: RequestFilter, sql: list[str], args: list) -> None:
    """Append the filter's conditions (bound parameters only)."""
    for column, value in (
        ("provider", where.provider),
        ("model", where.model),
        ("key_id", where.key_id),
    ):
        if value is not None:
            sql.append(f"AND {column} = %s")
            args.append(value)
    for condition, value in (
        ("status >= %s", where.status_min),
        ("status <= %s", where.status_max),
        ("created_at >= %s", where.since),
        ("created_at < %s", where.until),
    ):
        if value is not None:
            sql.append(f"AND {condition}")
            args.append(value)


def _array(values: list) -> str:
    """A PostgreSQL array literal with every element quoted (or NULL): one
    bound parameter per column instead of one per value, which keeps the
    client-side cost of a 500-row batch to about a millisecond. Quoting every
    element means no value can shift the others: a bad value is an error for
    its batch, never a misaligned row."""
    parts = []
    append = parts.append
    for v in values:
        if v is None:
            append("NULL")
            continue
        s = v if type(v) is str else str(v)
        if "\\" in s or '"' in s:
            s = s.replace("\\", "\\\\").replace('"', '\\"')
        append('"' + s + '"')
    return "{" + ",".join(parts) + "}"


def _columns(rows: Sequence[UsageRecord]) -> tuple[str, ...]:
    """The column arrays of a batch, in ``_INSERT_COLUMNS`` order."""
    return (
        _array([r.request_id for r in rows]),
        _array([r.created_at.isoformat() for r in rows]),
        _array([r.org_id for r in rows]),
        _array([r.key_id for r in rows]),
        _array([r.provider for r in rows]),
        _array([r.model for r in rows]),
        _array([r.method for r in rows]),
        _array([r.path for r in rows]),
        _array([r.status for r in rows]),
        _array([r.latency_ms for r in rows]),
        _array([r.ttfb_ms for r in rows]),
        _array([r.streamed for r in rows]),
        _array([r.usage.prompt_tokens for r in rows]),
        _array([r.usage.completion_tokens for r in rows]),
        _array([r.usage.total_tokens for r in rows]),
        _array([r.usage.cached_tokens for r in rows]),
        _array([r.usage.cache_creation_tokens for r in rows]),
        _array([r.usage.source for r in rows]),
        _array([r.error_type for r in rows]),
        _array([r.route for r in rows]),
        _array([r.provider_key_id for r in rows]),
        _array([r.attempts for r in rows]),
        _array([_json(r.fallbacks) for r in rows]),
    )


def _json(fallbacks: tuple[dict, ...]) -> str | None:
    if not fallbacks:
        return None
    return json.dumps(list(fallbacks), separators=(",", ":"))


class RequestLogStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- writes -------------------------------------------------------------------

    async def delete_older_than(self, cutoff: datetime, limit: int) -> int | None:
        """Delete up to ``limit`` rows created before ``cutoff``, oldest
        first. None when another node holds the retention lock (it is doing
        the same work)."""

        async def txn(t: Transaction) -> int | None:
            locked = await t.fetchone("SELECT pg_try_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
            if not locked[0]:
                return None
            return await t.execute(
                "DELETE FROM request_logs WHERE id IN ("
                " SELECT id FROM request_logs WHERE created_at < %s"
                " ORDER BY created_at LIMIT %s)",
                (cutoff, limit),
            )

        return await self._db.runInteraction("expire_request_logs", txn)

    async def insert(self, rows: Sequence[UsageRecord]) -> int:
        """Insert ``rows`` in one transaction; rows whose ``request_id`` is
        already stored are skipped. Returns the number of rows inserted."""
        if not rows:
            return 0
        args = _columns(rows)

        async def txn(t: Transaction) -> int:
            return await t.execute(_INSERT_SQL, args)

        return await self._db.runInteraction("insert_request_logs", txn)

    # --- reads --------------------------------------------------------------------

    async def recent(
        self,
        org_id: str,
        *,
        limit: int,
        before: tuple[datetime, int] | None = None,
        where: RequestFilter = RequestFilter(),
    ) -> list[RequestLog]:
        """An org's requests, newest first: at most ``limit`` rows strictly
        older than ``before`` (a ``(created_at, id)`` keyset position)."""
        sql = [f"SELECT {_SELECT_COLUMNS} FROM request_logs WHERE org_id = %s"]
        args: list = [org_id]
        _conditions(where, sql, args)
        if before is not None:
            sql.append("AND (created_at, id) < (%s, %s)")
            args.extend(before)
        sql.append("ORDER BY created_at DESC, id DESC LIMIT %s")
        args.append(limit)
        rows = await self._db.runQuery("list_request_logs", " ".join(sql), args)
        return [RequestLog(*r) for r in rows]

    async def totals(
        self, org_id: str, *, since: datetime, until: datetime, group_by: str, limit: int
    ) -> list[UsageAggregate]:
        """Request and token totals of an org over ``[since, until)``, grouped
        by model, provider, Lectr key, UTC day or UTC hour; at most ``limit``
        groups (the busiest first; days and hours in order)."""
        key, order = _GROUP_KEYS[group_by]
        sql = (
            f"SELECT {key} AS key, {_TOTALS} "
            "FROM request_logs WHERE org_id = %s AND created_at >= %s AND created_at < %s "
            f"GROUP BY 1 ORDER BY {order} LIMIT %s"
        )
        rows = await self._db.runQuery(
            f"request_log_totals_by_{group_by}", sql, (org_id, since, until, limit)
        )
        return [UsageAggregate(*r) for r in rows]

    async def totals_by_org(
        self, org_ids: list[str] | None, *, since: datetime, until: datetime
    ) -> list[UsageAggregate]:
        """One total per org over ``[since, until)`` (``key`` is the org id),
        for the given orgs (None: every org)."""
        sql = [
            f"SELECT org_id AS key, {_TOTALS} FROM request_logs "
            "WHERE created_at >= %s AND created_at < %s"
        ]
        args: list = [since, until]
        if org_ids is not None:
            sql.append("AND org_id = ANY(%s::uuid[])")
            args.append(list(org_ids))
        sql.append("GROUP BY 1")
        rows = await self._db.runQuery("request_log_totals_by_org", " ".join(sql), args)
        return [UsageAggregate(*r) for r in rows]

    async def get(self, org_id: str, request_id: str) -> RequestLog | None:
        rows = await self._db.runQuery(
            "get_request_log",
            f"SELECT {_SELECT_COLUMNS} FROM request_logs WHERE request_id = %s AND org_id = %s",
            (request_id, org_id),
        )
        return RequestLog(*rows[0]) if rows else None

    async def newer(
        self, org_id: str, *, after_id: int, limit: int, where: RequestFilter = RequestFilter()
    ) -> list[RequestLog]:
        """An org's rows stored after row ``after_id`` (ids grow as rows are
        inserted), in insertion order: what a live view has not seen yet.
        The scan walks the primary key from ``after_id``, so it reads only
        the rows (of every org) inserted since."""
        sql = [f"SELECT {_SELECT_COLUMNS} FROM request_logs WHERE id > %s AND org_id = %s"]
        args: list = [after_id, org_id]
        _conditions(where, sql, args)
        sql.append("ORDER BY id LIMIT %s")
        args.append(limit)
        rows = await self._db.runQuery("newer_request_logs", " ".join(sql), args)
        return [RequestLog(*r) for r in rows]

    async def last_id(self) -> int:
        """The id of the newest stored row (0 when there is none): a live
        view's starting point (one step down the primary key)."""
        rows = await self._db.runQuery("last_request_log_id", "SELECT max(id) FROM request_logs")
        return rows[0][0] or 0

    async def count(self, org_id: str | None = None) -> int:
        """How many rows (of one org); for tests and tooling."""
        if org_id is None:
            rows = await self._db.runQuery(
                "count_request_logs", "SELECT count(*) FROM request_logs"
            )
        else:
            rows = await self._db.runQuery(
                "count_request_logs",
                "SELECT count(*) FROM request_logs WHERE org_id = %s",
                (org_id,),
            )
        return rows[0][0]
