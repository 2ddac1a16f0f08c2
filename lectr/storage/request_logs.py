"""SQL for ``request_logs``: batched inserts, the read-back queries, and
the partitions.

Writes are one multi-row ``INSERT … SELECT … FROM unnest(…)`` per batch
(txpostgres has neither ``executemany`` nor COPY), idempotent on
``(request_id, created_at)`` (one request is one row, with one arrival time)
so a batch replayed from the spill journal never duplicates a row. Reads are
keyset-paginated on ``(created_at DESC, id DESC)`` and only ever filter with
parameters.

The table is partitioned by range of ``created_at`` (migration 0008):
``request_logs_pYYYYMMDD`` partitions plus ``request_logs_default`` for rows
no partition covers. The maintenance statements (create, drop, trim the
default partition) each run in a short transaction holding the advisory lock
that makes one node at a time do this work, with a ``lock_timeout`` so that
DDL never queues behind long readers while blocking the inserts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg2
import psycopg2.errors

from lectr.db.database import Database, Transaction
from lectr.usage.model import UsageRecord

# "LECTRRET": one node at a time maintains the partitions (and expires rows)
_RETENTION_LOCK = int.from_bytes(b"LECTRRET", "big") & 0x7FFFFFFFFFFFFFFF


class MaintenanceBusy(Exception):
    """A partition could not be created or dropped now: another node holds
    the maintenance lock, or the table's lock was not granted in time."""


_INSERT_COLUMNS = (
    "request_id, created_at, org_id, key_id, provider, model, method, path, status, "
    "latency_ms, ttfb_ms, streamed, prompt_tokens, completion_tokens, total_tokens, "
    "cached_tokens, cache_creation_tokens, usage_source, error_type"
)
_INSERT_SQL = (
    f"INSERT INTO request_logs ({_INSERT_COLUMNS}) "
    "SELECT * FROM unnest("
    "%s::uuid[], %s::timestamptz[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::smallint[], %s::float8[], %s::float8[], %s::bool[], "
    "%s::int[], %s::int[], %s::int[], %s::int[], %s::int[], %s::text[], %s::text[]) "
    "ON CONFLICT (request_id, created_at) DO NOTHING"
)

DEFAULT_PARTITION = "request_logs_default"
# storage parameters of every partition (the parent takes none): see 0002
_PARTITION_OPTIONS = (
    "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 10000"
)
_BOUND_RE = re.compile(r"^FOR VALUES FROM \((.+)\) TO \((.+)\)$")

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


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: datetime | None  # inclusive; None: no lower bound (or the default partition)
    end: datetime | None  # exclusive; None: no upper bound (or the default partition)
    default: bool = False


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Optional conditions on a listing (each None: no condition)."""

    provider: str | None = None
    model: str | None = None
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
    "day": ("(created_at AT TIME ZONE 'UTC')::date", "key"),
}


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
    """The 19 column arrays of a batch, in ``_INSERT_COLUMNS`` order."""
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
    )


class RequestLogStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- writes -------------------------------------------------------------------

    async def delete_default_older_than(self, cutoff: datetime, limit: int) -> int | None:
        """Delete up to ``limit`` rows created before ``cutoff`` from the
        default partition, oldest first (the partitions are dropped whole).
        None when another node holds the maintenance lock."""

        async def txn(t: Transaction) -> int | None:
            if not await _try_lock(t):
                return None
            return await t.execute(
                f"DELETE FROM {DEFAULT_PARTITION} WHERE (id, created_at) IN ("
                f" SELECT id, created_at FROM {DEFAULT_PARTITION} WHERE created_at < %s"
                " ORDER BY created_at LIMIT %s)",
                (cutoff, limit),
            )

        return await self._db.runInteraction("expire_request_logs", txn)

    async def create_partition(self, name: str, start: datetime, end: datetime) -> bool:
        """Create the partition ``name`` for ``[start, end)``. Rows of that
        range waiting in the default partition move into it. False when a
        partition already covers part of the range. Raises MaintenanceBusy."""

        async def txn(t: Transaction) -> bool:
            await _lock_for_ddl(t)
            overlap = await t.fetchone(
                "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'request_logs'::regclass AND c.relname = %s",
                (name,),
            )
            if overlap:
                return False
            stray = await t.fetchone(
                f"SELECT 1 FROM {DEFAULT_PARTITION} WHERE created_at >= %s AND created_at < %s "
                "LIMIT 1",
                (start, end),
            )
            try:
                if stray is None:
                    await t.execute(
                        f"CREATE TABLE {_ident(name)} PARTITION OF request_logs "
                        f"FOR VALUES FROM (%s) TO (%s) WITH ({_PARTITION_OPTIONS})",
                        (start, end),
                    )
                    return True
                # rows of this range went to the default partition meanwhile:
                # move them into the new table, then attach it
                columns = await _parent_columns(t)
                await t.execute(
                    f"CREATE TABLE {_ident(name)} (LIKE request_logs INCLUDING DEFAULTS "
                    f"INCLUDING CONSTRAINTS) WITH ({_PARTITION_OPTIONS})"
                )
                await t.execute(
                    f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
                    f"WHERE created_at >= %s AND created_at < %s RETURNING {columns}) "
                    f"INSERT INTO {_ident(name)} ({columns}) SELECT {columns} FROM moved",
                    (start, end),
                )
                await t.execute(
                    f"ALTER TABLE request_logs ATTACH PARTITION {_ident(name)} "
                    "FOR VALUES FROM (%s) TO (%s)",
                    (start, end),
                )
                return True
            except psycopg2.errors.InvalidObjectDefinition:
                return False  # "would overlap partition …"

        try:
            return await self._db.runInteraction("create_request_log_partition", txn)
        except psycopg2.errors.LockNotAvailable:
            raise MaintenanceBusy("request_logs is busy") from None

    async def drop_partition(self, name: str) -> None:
        """Drop one partition and its rows. Raises MaintenanceBusy."""

        async def txn(t: Transaction) -> None:
            await _lock_for_ddl(t)
            await t.execute(f"DROP TABLE IF EXISTS {_ident(name)}")

        if name == DEFAULT_PARTITION or not name.startswith("request_logs_p"):
            raise ValueError(f"not a dated request-log partition: {name}")
        try:
            await self._db.runInteraction("drop_request_log_partition", txn)
        except psycopg2.errors.LockNotAvailable:
            raise MaintenanceBusy("request_logs is busy") from None

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
        if where.provider is not None:
            sql.append("AND provider = %s")
            args.append(where.provider)
        if where.model is not None:
            sql.append("AND model = %s")
            args.append(where.model)
        if where.status_min is not None:
            sql.append("AND status >= %s")
            args.append(where.status_min)
        if where.status_max is not None:
            sql.append("AND status <= %s")
            args.append(where.status_max)
        if where.since is not None:
            sql.append("AND created_at >= %s")
            args.append(where.since)
        if where.until is not None:
            sql.append("AND created_at < %s")
            args.append(where.until)
        if before is not None:
            # the plain bound lets the planner skip newer partitions (it
            # cannot prune on the row comparison)
            sql.append("AND created_at <= %s AND (created_at, id) < (%s, %s)")
            args.extend((before[0], *before))
        sql.append("ORDER BY created_at DESC, id DESC LIMIT %s")
        args.append(limit)
        rows = await self._db.runQuery("list_request_logs", " ".join(sql), args)
        return [RequestLog(*r) for r in rows]

    async def totals(
        self, org_id: str, *, since: datetime, until: datetime, group_by: str, limit: int
    ) -> list[UsageAggregate]:
        """Request and token totals of an org over ``[since, until)``, grouped
        by model, provider or UTC day; at most ``limit`` groups (the busiest
        first; days in order)."""
        key, order = _GROUP_KEYS[group_by]
        sql = (
            f"SELECT {key} AS key, count(*) AS requests, "
            "count(*) FILTER (WHERE status >= 400), "
            "count(*) FILTER (WHERE usage_source = 'none'), "
            "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
            "coalesce(sum(total_tokens), 0), coalesce(sum(cached_tokens), 0), "
            "coalesce(sum(cache_creation_tokens), 0) "
            "FROM request_logs WHERE org_id = %s AND created_at >= %s AND created_at < %s "
            f"GROUP BY 1 ORDER BY {order} LIMIT %s"
        )
        rows = await self._db.runQuery(
            f"request_log_totals_by_{group_by}", sql, (org_id, since, until, limit)
        )
        return [UsageAggregate(*r) for r in rows]

    async def partitions(self) -> list[Partition]:
        """Every partition of request_logs, with its bounds (UTC)."""

        async def txn(t: Transaction) -> list[tuple]:
            await t.execute("SET LOCAL TimeZone = 'UTC'")
            return await t.fetchall(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'request_logs'::regclass ORDER BY c.relname"
            )

        rows = await self._db.runInteraction("list_request_log_partitions", txn)
        return [_partition(name, bound) for name, bound in rows]

    async def default_rows(self, limit: int) -> int:
        """Rows in the default partition (counted up to ``limit``)."""
        rows = await self._db.runQuery(
            "count_default_request_logs",
            f"SELECT count(*) FROM (SELECT 1 FROM {DEFAULT_PARTITION} LIMIT %s) AS r",
            (limit,),
        )
        return rows[0][0]

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


# --- partitions -------------------------------------------------------------------


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a table name: {name!r}")
    return name


async def _try_lock(t: Transaction) -> bool:
    locked = await t.fetchone("SELECT pg_try_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
    return bool(locked[0])


async def _lock_for_ddl(t: Transaction) -> None:
    if not await _try_lock(t):
        raise MaintenanceBusy("another node is maintaining the request-log partitions")
    # DDL on a partition locks the parent: wait for it briefly or not at all,
    # never in the queue ahead of the inserts for long
    await t.execute("SET LOCAL lock_timeout = '2s'")


async def _parent_columns(t: Transaction) -> str:
    row = await t.fetchone(
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = 'request_logs'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    return row[0]


def _bound(text: str) -> datetime | None:
    text = text.strip()
    if text in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(text.strip("'"))


def _partition(name: str, bound: str) -> Partition:
    if bound == "DEFAULT":
        return Partition(name, None, None, default=True)
    m = _BOUND_RE.match(bound)
    if m is None:
        raise ValueError(f"unexpected partition bound of {name}: {bound}")
    return Partition(name, _bound(m.group(1)), _bound(m.group(2)))
