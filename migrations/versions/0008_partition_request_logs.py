"""request_logs becomes a table partitioned by range of created_at

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-10

At a few thousand requests per second (a billion rows a week), deleting
expired rows and vacuuming behind them cannot keep up, and the read-back
indexes outgrow memory. A partitioned table drops a whole partition to expire
rows, prunes partitions for time-bounded queries, and keeps each partition's
indexes small.

The conversion, in the migration's transaction (inserts into request_logs
wait meanwhile; the usage recorder spills and replays, the proxy is not
affected):

1. the table is renamed ``request_logs_unpartitioned``; its indexes and
   statistics objects are read from the catalog;
2. a new ``request_logs`` is made ``LIKE`` it (every column, default, CHECK
   constraint and identity, whatever migrations ran before this one),
   ``PARTITION BY RANGE (created_at)``;
3. partitions are created a week each (Monday 00:00 UTC), from the oldest
   row's week to two weeks ahead (at most ten years back: older rows, and
   rows dated beyond that, land in the DEFAULT partition ``request_logs_default``);
4. the rows are copied with the column list read from the catalog (ids kept:
   ``OVERRIDING SYSTEM VALUE``), the identity continues where it was, the old
   table is dropped;
5. the primary key becomes ``(id, created_at)`` and the uniqueness of
   ``request_id`` becomes ``(request_id, created_at)`` (a partitioned table's
   unique constraints include its partition key; the recorder's idempotent
   replay now conflicts on that pair, which is the same row's); every other
   index and statistics object is rebuilt on the parent from its definition
   (a unique one without created_at stops the migration with a message);
6. ANALYZE.

From then on the partition job (``lectr.usage.retention``) creates
partitions ahead of time (a day or a week each, by
``LECTR_REQUEST_LOG_RETENTION_DAYS``) and retention drops whole partitions.
Measured: 5 million rows (about 2.9 GiB with indexes) convert in 32 s on
the development machine, 56 s while it was loaded (``bench/partition_bench.py
convert``).

The downgrade does the reverse (one table, ``PRIMARY KEY (id)``,
``UNIQUE (request_id)``), copying the rows back.
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLE = "request_logs"
ASIDE = "request_logs_unpartitioned"
PARTITIONED_ASIDE = "request_logs_partitioned"
DEFAULT_PARTITION = "request_logs_default"
# set on every partition (a partitioned parent takes no storage parameters);
# the same as 0002 set on the single table
PARTITION_OPTIONS = (
    "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_insert_threshold = 10000"
)
_LIKE = (
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY INCLUDING GENERATED "
    "INCLUDING COMMENTS INCLUDING STORAGE INCLUDING COMPRESSION"
)
_HISTORY_LIMIT = timedelta(days=3653)
_AHEAD = timedelta(days=14)


def _rows(sql: str, **params) -> list:
    return op.get_bind().execute(sa.text(sql), params).all()


def _run(sql: str, **params) -> None:
    op.get_bind().execute(sa.text(sql), params)


def _indexes(table: str) -> list:
    """(name, definition, constraint type or None, columns) of ``table``'s indexes."""
    return _rows(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), con.contype, "
        "  ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, n) "
        "        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "        ORDER BY k.n)::text[], i.indisunique "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid "
        "WHERE i.indrelid = CAST(:t AS regclass) ORDER BY c.relname",
        t=table,
    )


def _statistics(table: str) -> list:
    return _rows(
        "SELECT stxname, pg_get_statisticsobjdef(oid) FROM pg_statistic_ext "
        "WHERE stxrelid = CAST(:t AS regclass) ORDER BY stxname",
        t=table,
    )


def _columns(table: str) -> str:
    (cols,) = _rows(
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = ''",
        t=table,
    )[0]
    return cols


def _identities(table: str) -> list[str]:
    return [
        r[0]
        for r in _rows(
            "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) "
            "AND attnum > 0 AND NOT attisdropped AND attidentity <> '' ORDER BY attnum",
            t=table,
        )
    ]


def _copy(source: str, target: str) -> None:
    """Copy every row, ids included, and continue the identities after them."""
    cols = _columns(source)
    _run(f"INSERT INTO {target} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {source}")
    for column in _identities(target):
        # (an empty table whose sequence never ran: the next id stays 1)
        _run(
            "SELECT setval(pg_get_serial_sequence(:target, :col), coalesce(greatest(m, v), 1),"
            "  greatest(m, v) IS NOT NULL) FROM ("
            f"  SELECT (SELECT max({column}) FROM {source}) AS m,"
            "  pg_sequence_last_value(CAST(pg_get_serial_sequence(:source, :col) AS regclass))"
            "  AS v) AS s",
            target=target,
            source=source,
            col=column,
        )


def _rename_sequences(table: str) -> None:
    """The new identity sequences got a suffixed name while the old ones
    existed: give them the usual one."""
    for column in _identities(table):
        (seq,) = _rows("SELECT pg_get_serial_sequence(:t, :c)", t=table, c=column)[0]
        wanted = f"{table}_{column}_seq"
        if seq.split(".")[-1].strip('"') != wanted:
            _run(f"ALTER SEQUENCE {seq} RENAME TO {wanted}")


def _rebuild(indexes: list, stats: list, source: str, target: str, only: bool) -> None:
    """Recreate the plain indexes and statistics of ``source`` on ``target``
    from their definitions."""
    on = f" ON ONLY public.{source} " if only else f" ON public.{source} "
    for name, definition, contype, _, unique in indexes:
        if contype is not None:
            continue  # constraints are made explicitly
        if unique:
            raise RuntimeError(
                f"{source} has the unique index {name} that is not a constraint; rebuild it by hand"
            )
        if on not in definition:
            raise RuntimeError(f"unexpected definition of index {name}: {definition}")
        _run(definition.replace(on, f" ON public.{target} ", 1))
    for name, definition in stats:
        for qualified in (f" FROM public.{source}", f" FROM {source}"):
            if definition.endswith(qualified):
                _run(definition[: -len(qualified)] + f" FROM {target}")
                break
        else:
            raise RuntimeError(f"unexpected definition of statistics {name}: {definition}")


def _monday(t: datetime) -> datetime:
    day = t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def _literal(t: datetime) -> str:
    return "'" + t.strftime("%Y-%m-%d %H:%M:%S+00") + "'"


def upgrade() -> None:
    _run(f"ALTER TABLE {TABLE} RENAME TO {ASIDE}")
    indexes, stats = _indexes(ASIDE), _statistics(ASIDE)
    constraints = []
    for name, _, contype, columns, _ in indexes:
        if contype is None:
            continue
        if contype == "p" or (contype == "u" and name == f"{TABLE}_request_id_key"):
            if "created_at" not in columns:
                columns = [*columns, "created_at"]
            kind = "PRIMARY KEY" if contype == "p" else "UNIQUE"
            constraints.append(f"ADD CONSTRAINT {name} {kind} ({', '.join(columns)})")
        elif "created_at" in columns:
            constraints.append(
                f"ADD CONSTRAINT {name} {'UNIQUE' if contype == 'u' else 'PRIMARY KEY'} "
                f"({', '.join(columns)})"
            )
        else:
            raise RuntimeError(
                f"{TABLE} has the constraint {name} on ({', '.join(columns)}): a partitioned "
                "table's unique constraints must include created_at"
            )

    _run(f"CREATE TABLE {TABLE} (LIKE {ASIDE} {_LIKE}) PARTITION BY RANGE (created_at)")
    _run(
        f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT WITH ({PARTITION_OPTIONS})"
    )
    ((oldest,),) = _rows(f"SELECT min(created_at) FROM {ASIDE}")
    now = datetime.now(UTC)
    start = _monday(max(oldest or now, now - _HISTORY_LIMIT))
    end = _monday(now + _AHEAD) + timedelta(days=7)
    while start < end:
        upper = start + timedelta(days=7)
        _run(
            f"CREATE TABLE {TABLE}_p{start:%Y%m%d} PARTITION OF {TABLE} "
            f"FOR VALUES FROM ({_literal(start)}) TO ({_literal(upper)}) "
            f"WITH ({PARTITION_OPTIONS})"
        )
        start = upper

    _copy(ASIDE, TABLE)
    _run(f"DROP TABLE {ASIDE}")
    _rename_sequences(TABLE)
    if constraints:
        _run(f"ALTER TABLE {TABLE} " + ", ".join(constraints))
    _rebuild(indexes, stats, ASIDE, TABLE, only=False)
    _run(f"ANALYZE {TABLE}")


def downgrade() -> None:
    _run(f"ALTER TABLE {TABLE} RENAME TO {PARTITIONED_ASIDE}")
    indexes, stats = _indexes(PARTITIONED_ASIDE), _statistics(PARTITIONED_ASIDE)
    constraints = []
    for name, _, contype, columns, _ in indexes:
        if contype is None:
            continue
        if contype == "p" or name == f"{TABLE}_request_id_key":
            columns = [c for c in columns if c != "created_at"]
        kind = "PRIMARY KEY" if contype == "p" else "UNIQUE"
        constraints.append(f"ADD CONSTRAINT {name} {kind} ({', '.join(columns)})")
    _run(f"CREATE TABLE {TABLE} (LIKE {PARTITIONED_ASIDE} {_LIKE})")
    _copy(PARTITIONED_ASIDE, TABLE)
    _run(f"DROP TABLE {PARTITIONED_ASIDE}")  # and its partitions
    _rename_sequences(TABLE)
    if constraints:
        _run(f"ALTER TABLE {TABLE} " + ", ".join(constraints))
    _rebuild(indexes, stats, PARTITIONED_ASIDE, TABLE, only=True)
    _run(f"ALTER TABLE {TABLE} SET ({PARTITION_OPTIONS})")
    _run(f"ANALYZE {TABLE}")
