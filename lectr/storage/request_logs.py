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

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

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
    "cached_tokens, cache_creation_tokens, usage_source, error_type, reasoning_tokens, "
    "cache_creation_1h_tokens, response_model, usage_raw, cost_usd, price_basis_id, "
    "route, provider_key_id, attempts, fallbacks, service_tier, web_search_requests"
)
NIL_UUID = "00000000-0000-0000-0000-000000000000"

# The rollup columns, and how one batch of inserted rows adds to them.
ROLLUP_COUNTS = (
    "requests",
    "errors",
    "unmetered",
    "estimated",
    "unpriced",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "reasoning_tokens",
)
_ROLLUP_VALUES = (
    "count(*), count(*) FILTER (WHERE status >= 400), "
    "count(*) FILTER (WHERE usage_source = 'none'), "
    "count(*) FILTER (WHERE usage_source = 'estimated'), "
    "count(*) FILTER (WHERE usage_source <> 'none' AND cost_usd IS NULL), "
    "count(*) FILTER (WHERE cached_tokens > 0), "
    "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
    "coalesce(sum(total_tokens), 0), coalesce(sum(cached_tokens), 0), "
    "coalesce(sum(cache_creation_tokens), 0), coalesce(sum(cache_creation_1h_tokens), 0), "
    "coalesce(sum(reasoning_tokens), 0), coalesce(sum(cost_usd), 0)"
)
_ROLLUP_KEY = (
    "org_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', "
    f"provider, coalesce(model, ''), coalesce(key_id, '{NIL_UUID}'::uuid)"
)
_ROLLUP_ADD = ", ".join(f"{c} = u.{c} + EXCLUDED.{c}" for c in (*ROLLUP_COUNTS, "cost_usd"))


def add_rollups_sql(rows: str) -> str:
    """The statement adding the rows of ``rows`` (a table or a CTE with
    request_logs' columns) to their hourly rollups, in key order (the lock
    order that keeps concurrent batches from deadlocking)."""
    return (
        "INSERT INTO usage_hourly AS u (org_id, hour, provider, model, key_id, "
        f"{', '.join(ROLLUP_COUNTS)}, cost_usd)"
        f" SELECT {_ROLLUP_KEY}, {_ROLLUP_VALUES} FROM {rows}"
        " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5"
        " ON CONFLICT (org_id, hour, provider, model, key_id) DO UPDATE SET "
        f"{_ROLLUP_ADD}"
    )


# One statement per batch: the rows (skipping request ids already stored, so
# a replay never counts twice), the price bases they name, and the hourly
# rollups of exactly the rows inserted; the rollup rows are locked in key
# order, so concurrent batches from several nodes cannot deadlock.
_INSERT_SQL = (
    "WITH bases AS ("
    " INSERT INTO price_bases (id, basis)"
    " SELECT * FROM unnest(%s::bigint[], %s::jsonb[]) ORDER BY 1 ON CONFLICT DO NOTHING"
    "), ins AS ("
    f" INSERT INTO request_logs ({_INSERT_COLUMNS})"
    " SELECT * FROM unnest("
    "%s::uuid[], %s::timestamptz[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::smallint[], %s::float8[], %s::float8[], %s::bool[], "
    "%s::int[], %s::int[], %s::int[], %s::int[], %s::int[], %s::text[], %s::text[], "
    "%s::int[], %s::int[], %s::text[], %s::text[], %s::numeric[], %s::bigint[], "
    "%s::text[], %s::uuid[], %s::smallint[], %s::jsonb[], %s::text[], %s::int[]) "
    # in request id order: concurrent batches holding the same rows (a replay
    # racing a late commit) wait for each other instead of deadlocking
    " ORDER BY 1"
    # the one unique key a replay can meet (a partitioned table's unique keys
    # include created_at, migration 0008): without a target, PostgreSQL checks
    # the primary key too, whose ids come from the identity and never conflict
    # (about 4 µs of the server's CPU per row once a partition holds a million)
    " ON CONFLICT (request_id, created_at) DO NOTHING"
    " RETURNING org_id, created_at, provider, model, key_id, status, usage_source,"
    " prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_creation_tokens,"
    " cache_creation_1h_tokens, reasoning_tokens, cost_usd"
    f"), hourly AS ({add_rollups_sql('ins')}"
    ") SELECT count(*) FROM ins"
)

#: the rollups computed from scratch from the rows stored (tests, benchmarks,
#: and an operator who deleted rows by hand: run it after DELETE FROM usage_hourly)
ROLLUPS_FROM_ROWS_SQL = (
    "INSERT INTO usage_hourly (org_id, hour, provider, model, key_id, "
    f"{', '.join(ROLLUP_COUNTS)}, cost_usd) "
    f"SELECT {_ROLLUP_KEY}, {_ROLLUP_VALUES} FROM request_logs GROUP BY 1, 2, 3, 4, 5"
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
    reasoning_tokens: int | None = None
    cache_creation_1h_tokens: int | None = None
    response_model: str | None = None
    usage_raw: str | None = None
    cost_usd: Decimal | None = None
    price_basis_id: int | None = None
    route: str | None = None
    provider_key_id: str | None = None
    attempts: int = 1
    fallbacks: list | None = None
    service_tier: str | None = None
    web_search_requests: int | None = None


@dataclass(frozen=True, slots=True)
class RequestDetail:
    """One request with the prices its cost was computed from."""

    row: RequestLog
    basis: dict | None  # the price_bases document (None: unpriced)


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
    key_id: str | None = None
    status_min: int | None = None  # inclusive
    status_max: int | None = None  # inclusive
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    # the model or provider (str, model may be None), the key id (may be
    # None), the UTC day (date) or the hour (datetime)
    key: object
    requests: int
    errors: int  # status >= 400
    unmetered: int  # usage_source = 'none'
    estimated: int  # usage_source = 'estimated'
    unpriced: int  # metered, but no cost (a model without a price)
    cache_hits: int  # requests with cached_tokens > 0
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    cache_creation_tokens: int
    cache_creation_1h_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal


# Group keys are chosen from this table, never from caller text.
_GROUP_KEYS = {
    "model": ("nullif(model, '')", "requests DESC, key NULLS LAST"),
    "provider": ("provider", "requests DESC, key"),
    "key": (f"nullif(key_id, '{NIL_UUID}'::uuid)", "requests DESC, key NULLS LAST"),
    "day": ("(hour AT TIME ZONE 'UTC')::date", "key"),
    "hour": ("hour", "key"),
}
_TOTALS = ", ".join(f"sum({c})::bigint AS {c}" for c in ROLLUP_COUNTS) + ", sum(cost_usd)"


#: a live view's position: PostgreSQL's snapshot, as xmin:xmax:xip,...
_SNAPSHOT_SQL = "SELECT pg_current_snapshot()::text"
#: how far past an old cursor's row id its answer looks (see newer_than_id)
LEGACY_CURSOR_WINDOW = 100_000


def newer_sql(
    org_id: str,
    unseen_by: str,
    after: tuple[int, int] | None,
    limit: int,
    where: RequestFilter,
) -> tuple[str, list]:
    """The query of :meth:`RequestLogStore.newer`: an org's rows in commit
    order along ``request_logs_live_idx``, from the snapshot's xmin (no
    transaction below it was in progress), up to the reading snapshot's
    xmax: a row this database stored has a lower txid, so a higher one is
    another cluster's (a pg_dump restored here keeps the txids of the
    rows it copied), which is not new and would else be unseen by every
    later snapshot, given again at every poll."""
    sql = [
        f"SELECT {_SELECT_COLUMNS}, txid FROM request_logs WHERE org_id = %s "
        "AND txid >= %s AND txid < pg_snapshot_xmax(pg_current_snapshot())::text::bigint "
        "AND NOT pg_visible_in_snapshot(txid::text::xid8, %s::pg_snapshot)"
    ]
    args: list = [org_id, int(unseen_by.split(":", 1)[0]), unseen_by]
    if after is not None:
        sql.append("AND (txid, id) > (%s, %s)")
        args += after
    _conditions(where, sql, args)
    sql.append("ORDER BY txid, id LIMIT %s")
    args.append(limit)
    return " ".join(sql), args


def newer_than_id_sql(
    org_id: str, after_id: int, limit: int, where: RequestFilter
) -> tuple[str, list]:
    """The query of :meth:`RequestLogStore.newer_than_id`."""
    sql = [
        f"SELECT {_SELECT_COLUMNS}, txid FROM request_logs "
        "WHERE id > %s AND id <= %s AND org_id = %s"
    ]
    args: list = [after_id, min(after_id + LEGACY_CURSOR_WINDOW, 2**63 - 1), org_id]
    _conditions(where, sql, args)
    sql.append("ORDER BY id LIMIT %s")
    args.append(limit)
    return " ".join(sql), args


def recent_sql(
    org_id: str, limit: int, before: tuple[datetime, int] | None, where: RequestFilter
) -> tuple[str, list]:
    """The query of :meth:`RequestLogStore.recent`."""
    sql = [f"SELECT {_SELECT_COLUMNS} FROM request_logs WHERE org_id = %s"]
    args: list = [org_id]
    _conditions(where, sql, args)
    if before is not None:
        # the plain bound lets the planner skip newer partitions (it
        # cannot prune on the row comparison)
        sql.append("AND created_at <= %s AND (created_at, id) < (%s, %s)")
        args.extend((before[0], *before))
    sql.append("ORDER BY created_at DESC, id DESC LIMIT %s")
    args.append(limit)
    return " ".join(sql), args


def totals_sql(
    org_id: str, since: datetime, until: datetime, group_by: str, limit: int
) -> tuple[str, list]:
    """The query of :meth:`RequestLogStore.totals`."""
    key, order = _GROUP_KEYS[group_by]
    sql = (
        f"SELECT {key} AS key, {_TOTALS} FROM usage_hourly "
        "WHERE org_id = %s AND hour >= %s AND hour < %s "
        f"GROUP BY 1 ORDER BY {order} LIMIT %s"
    )
    return sql, [org_id, since, until, limit]


def totals_by_org_sql(
    org_ids: list[str] | None, since: datetime, until: datetime
) -> tuple[str, list]:
    """The query of :meth:`RequestLogStore.totals_by_org`."""
    sql = [f"SELECT org_id AS key, {_TOTALS} FROM usage_hourly WHERE hour >= %s AND hour < %s"]
    args: list = [since, until]
    if org_ids is not None:
        sql.append("AND org_id = ANY(%s::uuid[])")
        args.append(list(org_ids))
    sql.append("GROUP BY 1")
    return " ".join(sql), args


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


_STR_ONLY = {str}


def _array(values: list) -> str:
    """A PostgreSQL array literal with every element quoted (or NULL): one
    bound parameter per column instead of one per value, which keeps the
    client-side cost of a 500-row batch to about a millisecond. Quoting every
    element means no value can shift the others: a bad value is an error for
    its batch, never a misaligned row."""
    if not values or set(map(type, values)) != _STR_ONLY:  # (None, numbers, subclasses)
        return _array_each(values)
    text = "".join(values)
    if "\\" not in text and '"' not in text:
        return '{"' + '","'.join(values) + '"}'
    if "\x00" in text:  # (PostgreSQL refuses it in text; the batch will say so)
        return _array_each(values)
    # every value escaped at once (JSON usage objects, paths with quotes),
    # joined by a separator no value holds
    text = "\x00".join(values).replace("\\", "\\\\").replace('"', '\\"')
    return '{"' + text.replace("\x00", '","') + '"}'


def _array_each(values: list) -> str:
    """:func:`_array` value by value: NULLs, non-strings, quotes and
    backslashes."""
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


_NUMERIC = (int, float, bool)
_NUMERIC_TYPES = frozenset(_NUMERIC)
_NUMERIC_OR_NONE = _NUMERIC_TYPES | {type(None)}
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:E[-+]?[0-9]+)?")


def _numbers(values: list) -> str:
    """An array literal of numbers (or booleans, or NULL) without quoting:
    their text cannot hold a separator. Anything else (a bug upstream)
    takes the quoting path, so it still cannot shift the other values."""
    types = set(map(type, values))
    if types <= _NUMERIC_TYPES:  # (str() of these is their literal)
        return "{" + ",".join(map(str, values)) + "}"
    if types <= _NUMERIC_OR_NONE:
        return "{" + ",".join(["NULL" if v is None else str(v) for v in values]) + "}"
    return _numbers_each(values)


def _numbers_each(values: list) -> str:
    """:func:`_numbers` value by value (Decimal text among them)."""
    try:
        return "{" + ",".join(["NULL" if v is None else _plain(v) for v in values]) + "}"
    except TypeError:
        return _array(values)


def _plain(v: object) -> str:
    if type(v) in _NUMERIC:
        return str(v)
    if type(v) is str and _DECIMAL_TEXT.fullmatch(v):  # a Decimal's text
        return v
    raise TypeError("not a number")


def _bases(rows: Sequence[UsageRecord]) -> tuple[str, str]:
    """The distinct price bases a batch names: (ids, documents) arrays."""
    seen: dict[int, str] = {}
    for r in rows:
        priced = r.pricing
        if priced is not None and priced.basis is not None:
            seen[priced.basis.id] = priced.basis.json
    return _array(list(seen)), _array(list(seen.values()))


def _basis_id(r: UsageRecord) -> int | None:
    priced = r.pricing
    return priced.basis.id if priced is not None and priced.basis is not None else None


#: rows prepared for a write in one turn of the reactor: their column arrays
#: here, their repair and GenAI metrics in the usage recorder (about 0.25 ms
#: each). A batch of 500 prepared at once held the reactor for 4-7 ms, which
#: the requests arriving meanwhile waited out (their p99 at c=1)
PREPARE_SLICE = 50


def _columns(rows: Sequence[UsageRecord]) -> tuple[str, ...]:
    """The two price-basis arrays and the column arrays of a batch, in
    ``_INSERT_SQL`` order."""
    return (*_bases(rows), *_row_columns(rows))


async def _columns_in_slices(rows: Sequence[UsageRecord], pause) -> tuple[str, ...]:
    """:func:`_columns`, built ``PREPARE_SLICE`` rows at a time with
    ``pause()`` (a Deferred) awaited between slices. The arrays are the
    same: a slice's array literal is never empty, so the slices' elements
    join with a comma."""
    if len(rows) <= PREPARE_SLICE:
        return _columns(rows)
    slices = []
    for i in range(0, len(rows), PREPARE_SLICE):
        if i:
            await pause()
        slices.append(_row_columns(rows[i : i + PREPARE_SLICE]))
    merged = tuple(
        "{" + ",".join(part[1:-1] for part in column) + "}" for column in zip(*slices, strict=True)
    )
    return (*_bases(rows), *merged)


def _row_columns(rows: Sequence[UsageRecord]) -> tuple[str, ...]:
    return (
        _array([r.request_id for r in rows]),
        _array([r.created_at.isoformat() for r in rows]),
        _array([r.org_id for r in rows]),
        _array([r.key_id for r in rows]),
        _array([r.provider for r in rows]),
        _array([r.model for r in rows]),
        _array([r.method for r in rows]),
        _array([r.path for r in rows]),
        _numbers([r.status for r in rows]),
        _numbers([r.latency_ms for r in rows]),
        _numbers([r.ttfb_ms for r in rows]),
        _numbers([r.streamed for r in rows]),
        _numbers([r.usage.prompt_tokens for r in rows]),
        _numbers([r.usage.completion_tokens for r in rows]),
        _numbers([r.usage.total_tokens for r in rows]),
        _numbers([r.usage.cached_tokens for r in rows]),
        _numbers([r.usage.cache_creation_tokens for r in rows]),
        _array([r.usage.source for r in rows]),
        _array([r.error_type for r in rows]),
        _numbers([r.usage.reasoning_tokens for r in rows]),
        _numbers([r.usage.cache_creation_1h_tokens for r in rows]),
        _array([r.usage.model for r in rows]),
        _array([r.usage.raw for r in rows]),
        # (str: PostgreSQL reads a Decimal's exponent form, 1.5E-7, exactly)
        _numbers([None if r.cost_usd is None else str(r.cost_usd) for r in rows]),
        _numbers([_basis_id(r) for r in rows]),
        _array([r.route for r in rows]),
        _array([r.provider_key_id for r in rows]),
        _numbers([r.attempts for r in rows]),
        _array([_json(r.fallbacks) for r in rows]),
        _array([r.usage.service_tier for r in rows]),
        _numbers([r.usage.web_search_requests for r in rows]),
    )


def _json(fallbacks: tuple[dict, ...]) -> str | None:
    if not fallbacks:
        return None
    return json.dumps(list(fallbacks), separators=(",", ":"))


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
                    await t.execute("SAVEPOINT plain_create")
                    try:
                        await t.execute(
                            f"CREATE TABLE {_ident(name)} PARTITION OF request_logs "
                            f"FOR VALUES FROM (%s) TO (%s) WITH ({_PARTITION_OPTIONS})",
                            (start, end),
                        )
                        return True
                    except psycopg2.errors.CheckViolation:
                        # a row of the range committed since the look: move
                        # it as below (the rollback frees the parent's lock)
                        await t.execute("ROLLBACK TO SAVEPOINT plain_create")
                # rows of this range went to the default partition meanwhile:
                # move them into the new table, then attach it
                columns = await _parent_columns(t)
                await t.execute(
                    f"CREATE TABLE {_ident(name)} (LIKE request_logs INCLUDING DEFAULTS "
                    f"INCLUDING CONSTRAINTS) WITH ({_PARTITION_OPTIONS})"
                )
                move = (
                    f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
                    f"WHERE created_at >= %s AND created_at < %s RETURNING {columns}) "
                    f"INSERT INTO {_ident(name)} ({columns}) SELECT {columns} FROM moved"
                )
                await t.execute(move, (start, end))  # (inserts go on meanwhile)
                # a row of the range committed since would fail the ATTACH
                # (a check violation, at every round while traffic goes on):
                # hold inserts into the default partition off (reads go on),
                # then move those few too. (SHARE, not a lock on the parent:
                # the ATTACH takes only SHARE UPDATE EXCLUSIVE there, which
                # waits for no insert, so no deadlock with one waiting here)
                await t.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN SHARE MODE")
                await t.execute(move, (start, end))
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
        """Insert ``rows`` in one statement (its own transaction), with their
        price bases and their share of the hourly rollups; rows whose
        ``request_id`` is already stored are skipped (and not counted again).
        Returns the number of rows inserted."""
        if not rows:
            return 0
        args = await _columns_in_slices(rows, self._db.pause)
        # One statement is atomic on its own: sent in autocommit it is one
        # round trip instead of three (BEGIN, the statement, COMMIT). It is
        # idempotent, so the retry on a connection found dead is safe.
        result = await self._db.runQuery("insert_request_logs", _INSERT_SQL, args)
        return result[0][0]

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
        sql, args = recent_sql(org_id, limit, before, where)
        rows = await self._db.runQuery("list_request_logs", sql, args)
        return [RequestLog(*r) for r in rows]

    async def totals(
        self, org_id: str, *, since: datetime, until: datetime, group_by: str, limit: int
    ) -> list[UsageAggregate]:
        """Request, token and cost totals of an org over the hours in
        ``[since, until)`` (read from the hourly rollups: ``since`` and
        ``until`` should be whole hours), grouped by model, provider, key,
        UTC day or hour; at most ``limit`` groups (the busiest first; days
        and hours in order)."""
        sql, args = totals_sql(org_id, since, until, group_by, limit)
        rows = await self._db.runQuery(f"usage_totals_by_{group_by}", sql, args)
        return [UsageAggregate(*r) for r in rows]

    async def totals_by_org(
        self, org_ids: list[str] | None, *, since: datetime, until: datetime
    ) -> list[UsageAggregate]:
        """One total per org over the hours in ``[since, until)`` (``key`` is
        the org id), for the given orgs (None: every org), from the rollups."""
        sql, args = totals_by_org_sql(org_ids, since, until)
        rows = await self._db.runQuery("usage_totals_by_org", sql, args)
        return [UsageAggregate(*r) for r in rows]

    async def snapshot(self) -> str:
        """PostgreSQL's current snapshot (``xmin:xmax:xip,...``): a live
        view's starting point. Every row it cannot see is new to the view,
        whenever it commits."""
        rows = await self._db.runQuery("live_snapshot", _SNAPSHOT_SQL)
        return rows[0][0]

    async def newer(
        self,
        org_id: str,
        *,
        unseen_by: str,
        after: tuple[int, int] | None = None,
        limit: int,
        where: RequestFilter = RequestFilter(),
    ) -> tuple[list[RequestLog], list[tuple[int, int]], str]:
        """An org's rows the snapshot ``unseen_by`` could not see (stored
        since, or stored before and committed since), in commit order
        (``(txid, id)``), past ``after`` (a ``(txid, id)`` position) when
        given; their positions; and the snapshot they were read in (one
        REPEATABLE READ transaction: every row it cannot see is newer).
        ``unseen_by`` must be a valid ``pg_snapshot`` text."""
        sql, args = newer_sql(org_id, unseen_by, after, limit, where)
        return await self._in_one_snapshot("newer_request_logs", sql, args)

    async def newer_than_id(
        self, org_id: str, *, after_id: int, limit: int, where: RequestFilter = RequestFilter()
    ) -> tuple[list[RequestLog], list[tuple[int, int]], str]:
        """:meth:`newer` for a live cursor of before migration 0009 (a row
        id): the rows stored after row ``after_id``, in id order, among the
        next LEGACY_CURSOR_WINDOW rows of every org (a cursor far behind, or
        forged as ``live:0``, never walks the whole table)."""
        sql, args = newer_than_id_sql(org_id, after_id, limit, where)
        return await self._in_one_snapshot("newer_request_logs_by_id", sql, args)

    async def _in_one_snapshot(
        self, desc: str, sql: str, args: list
    ) -> tuple[list[RequestLog], list[tuple[int, int]], str]:
        async def txn(t: Transaction):
            await t.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            (snapshot,) = await t.fetchone(_SNAPSHOT_SQL)
            return await t.fetchall(sql, args), snapshot

        rows, snapshot = await self._db.runInteraction(desc, txn)
        logs = [RequestLog(*r[:-1]) for r in rows]
        return logs, [(r[-1] or 0, r[0]) for r in rows], snapshot

    async def get(self, request_id: str) -> RequestDetail | None:
        """One request by its id, with its price basis."""
        rows = await self._db.runQuery(
            "get_request_log",
            f"SELECT {', '.join('r.' + c for c in _SELECT_COLUMNS.split(', '))}, b.basis "
            "FROM request_logs r LEFT JOIN price_bases b ON b.id = r.price_basis_id "
            "WHERE r.request_id = %s",
            (request_id,),
        )
        if not rows:
            return None
        *values, basis = rows[0]
        return RequestDetail(RequestLog(*values), basis)

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
