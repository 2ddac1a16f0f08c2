"""The partitioned request log at scale: conversion time, query plans and
timings, bytes per row.

    .venv/bin/python bench/partition_bench.py convert [--rows 5000000]
    .venv/bin/python bench/partition_bench.py scale [--rows 50000000] [--days 30]

``convert``: a scratch database at the revision before 0008, ``--rows`` rows
spread over 30 days (20 orgs), then the timed upgrade to 0008 (the copy into
weekly partitions, the indexes, ANALYZE), and a check that every row is there.

``scale``: a scratch database at head, one partition a day for ``--days``
days, ``--rows`` rows (200 orgs, 4 models, rare errors) loaded day by day,
VACUUM ANALYZE, then each read-back query of the admin API (``EXPLAIN
(ANALYZE, BUFFERS)``, best of 3, warm cache): the partitions each plan reads,
its execution time; and the disk used per row. 50M rows need about 25 GB of
disk while the script runs and take a while to load; the database is dropped
at the end (``--keep`` keeps it).

Needs a PostgreSQL server whose role may CREATE DATABASE (``--database-url``,
default ``LECTR_TEST_DATABASE_URL`` or ``postgresql://root@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2

from lectr.db.migrate import _alembic_config, upgrade_sync
from tests.support.pg import admin_execute, with_database

ORG = "00000000-0000-4000-8000-000000000007"  # one of the 200 (g % 200 = 7)

_ROWS_SQL = """
INSERT INTO request_logs (request_id, created_at, org_id, key_id, provider, model, method,
    path, status, latency_ms, ttfb_ms, streamed, prompt_tokens, completion_tokens,
    total_tokens, cached_tokens, usage_source)
SELECT gen_random_uuid(),
       %(start)s::timestamptz + (g - 1) * (%(span)s::float8 / %(n)s) * interval '1 second',
       ('00000000-0000-4000-8000-' || lpad((g %% %(orgs)s)::text, 12, '0'))::uuid,
       ('00000000-0000-4000-9000-' || lpad((g %% 1000)::text, 12, '0'))::uuid,
       CASE WHEN g %% 5 = 0 THEN 'anthropic' ELSE 'openai' END,
       (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-3-5-haiku-latest',
              'text-embedding-3-small'])[1 + g %% 4],
       'POST', '/v1/chat/completions',
       CASE WHEN g %% 997 = 0 THEN 500 WHEN g %% 211 = 0 THEN 429 ELSE 200 END,
       200 + g %% 3000, 40 + g %% 400, g %% 2 = 0,
       100 + g %% 2000, 10 + g %% 800, 110 + g %% 2800, CASE WHEN g %% 3 = 0 THEN 64 END,
       'provider'
FROM generate_series(%(first)s, %(last)s) g
"""


def connect(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def run(url: str, sql: str, args=None) -> list[tuple]:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def load(url: str, start: datetime, span_seconds: float, rows: int, orgs: int, chunk: int) -> float:
    """``rows`` rows evenly over ``span_seconds`` from ``start``; seconds taken."""
    began = time.perf_counter()
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
            for first in range(1, rows + 1, chunk):
                last = min(first + chunk - 1, rows)
                cur.execute(
                    _ROWS_SQL,
                    {
                        "start": start,
                        "first": first,
                        "last": last,
                        "span": span_seconds,
                        "n": rows,
                        "orgs": orgs,
                    },
                )
                done = time.perf_counter() - began
                print(
                    f"  loaded {last:,} rows ({last / done:,.0f} rows/s)",
                    end="\r",
                    flush=True,
                )
    finally:
        conn.close()
    print()
    return time.perf_counter() - began


def revision_before_0008() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_revision("0008").down_revision


def size_per_row(url: str) -> tuple[int, int]:
    (rows,) = run(url, "SELECT count(*) FROM request_logs")[0]
    (size,) = run(
        url,
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
        "WHERE inhparent = 'request_logs'::regclass",
    )[0]
    return int(rows), int(size)


def convert(server: str, rows: int) -> None:
    name = f"lectr_bench_convert_{os.getpid()}"
    admin_execute(server, f'CREATE DATABASE "{name}"')
    url = with_database(server, name)
    try:
        before = revision_before_0008()
        upgrade_sync(url, before)
        now = datetime.now(UTC)
        print(f"loading {rows:,} rows into the unpartitioned request_logs (revision {before})")
        load(url, now - timedelta(days=30), 30 * 86400, rows, 20, 1_000_000)
        run(url, "VACUUM ANALYZE request_logs")
        (size,) = run(url, "SELECT pg_total_relation_size('request_logs')")[0]
        checksum = "SELECT count(*), sum(id), md5(string_agg(request_id::text, '' ORDER BY id)) FROM request_logs"
        (expected,) = run(url, checksum)
        print(f"table with indexes: {size / 2**20:,.0f} MiB; converting (upgrade to 0008)…")
        started = time.perf_counter()
        upgrade_sync(url, "0008")
        elapsed = time.perf_counter() - started
        (got,) = run(url, checksum)
        assert got == expected, (got, expected)
        parts = run(
            url, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'request_logs'::regclass"
        )[0][0]
        print(
            f"converted {rows:,} rows in {elapsed:.1f} s ({rows / elapsed:,.0f} rows/s) into "
            f"{parts} partitions; every row is there (count, id sum and request-id digest match)"
        )
    finally:
        admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def explain(url: str, sql: str, args) -> tuple[float, set[str], str]:
    """(best execution ms of 3, partitions read, the text plan)."""
    best, plan = float("inf"), None
    for _ in range(3):
        (doc,) = run(url, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, args)[0]
        best = min(best, doc[0]["Execution Time"])
        plan = doc[0]["Plan"]
    scanned: set[str] = set()

    def walk(node) -> None:
        rel = node.get("Relation Name")
        if rel and node.get("Actual Loops", 0) > 0:
            scanned.add(rel)
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan)
    text = "\n".join(r[0] for r in run(url, "EXPLAIN (COSTS OFF) " + sql, args))
    return best, scanned, text


def queries(day: datetime, first: datetime, last: datetime) -> list[tuple[str, str, tuple]]:
    from lectr.storage.request_logs import RequestFilter, RequestLogStore

    captured: list[tuple[str, str, tuple]] = []

    class Capture:
        async def runQuery(self, desc, sql, args=None):
            captured.append((desc, sql, tuple(args)))
            return []

    spy = RequestLogStore(Capture())
    one_day = RequestFilter(since=day, until=day + timedelta(days=1))
    for coro in (
        spy.totals(ORG, since=day, until=day + timedelta(days=1), group_by="model", limit=100),
        spy.totals(ORG, since=day, until=day + timedelta(days=1), group_by="day", limit=100),
        spy.recent(ORG, limit=51, where=one_day),
        spy.recent(
            ORG,
            limit=51,
            where=RequestFilter(since=day, until=day + timedelta(days=1), status_min=500),
        ),
        spy.recent(ORG, limit=51),
        spy.recent(ORG, limit=51, before=(day + timedelta(hours=12), 10**12)),
        spy.totals(ORG, since=first, until=last, group_by="model", limit=100),
    ):
        try:
            coro.send(None)
        except StopIteration:
            pass
    labels = [
        "totals by model, one day",
        "totals by day, one day",
        "listing, one day, first page",
        "listing, one day, errors only",
        "listing, newest page (no time filter)",
        "listing, a page from a cursor mid-range",
        f"totals by model, all {(last - first).days} days",
    ]
    return [(label, sql, args) for label, (_, sql, args) in zip(labels, captured, strict=True)]


def scale(server: str, rows: int, days: int, keep: bool) -> None:
    name = f"lectr_bench_scale_{os.getpid()}"
    admin_execute(server, f'CREATE DATABASE "{name}"')
    url = with_database(server, name)
    try:
        upgrade_sync(url)
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        first = today - timedelta(days=days)
        # replace the migration's (empty) weekly partitions by one a day
        for (part,) in run(
            url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'request_logs'::regclass AND c.relname <> 'request_logs_default'",
        ):
            run(url, f"DROP TABLE {part}")
        for d in range(days):
            start = first + timedelta(days=d)
            run(
                url,
                f"CREATE TABLE request_logs_p{start:%Y%m%d} PARTITION OF request_logs "
                "FOR VALUES FROM (%s) TO (%s)",
                (start, start + timedelta(days=1)),
            )
        # bulk load: indexes and constraints off, then built once (much
        # faster than maintaining them row by row)
        constraints = run(
            url,
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'request_logs'::regclass AND contype IN ('p', 'u')",
        )
        indexes = run(
            url,
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'request_logs' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'request_logs'::regclass)",
        )
        for constraint, _ in constraints:
            run(url, f"ALTER TABLE request_logs DROP CONSTRAINT {constraint}")
        for index, _ in indexes:
            run(url, f"DROP INDEX {index}")
        print(f"loading {rows:,} rows over {days} daily partitions (200 orgs), without indexes…")
        seconds = load(url, first, days * 86400, rows, 200, 2_000_000)
        print(f"loaded in {seconds:,.0f} s ({rows / seconds:,.0f} rows/s)")
        started = time.perf_counter()
        conn = connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SET maintenance_work_mem = '512MB'")
                for constraint, definition in constraints:
                    cur.execute(
                        f"ALTER TABLE request_logs ADD CONSTRAINT {constraint} {definition}"
                    )
                for _, definition in indexes:
                    # a partitioned index's definition says ON ONLY: build it on every partition
                    cur.execute(definition.replace(" ON ONLY ", " ON ", 1))
        finally:
            conn.close()
        print(f"indexes and constraints built in {time.perf_counter() - started:,.0f} s")
        started = time.perf_counter()
        run(url, "VACUUM ANALYZE request_logs")
        print(f"VACUUM ANALYZE: {time.perf_counter() - started:,.0f} s")
        n, size = size_per_row(url)
        print(
            f"disk: {size / 2**30:,.1f} GiB for {n:,} rows = {size / n:,.0f} bytes per row "
            f"(table and indexes) = {size / n * 1e9 / 2**40:,.2f} TiB per billion rows"
        )
        day = first + timedelta(days=days // 2)
        print(
            f"\nqueries for one org (a 200th of the rows, {rows // 200 // days:,} a day), "
            "warm cache, best of 3:"
        )
        print("| query | partitions read | ms |")
        print("|---|---|---|")
        plans = []
        for label, sql, args in queries(day, first, today):
            ms, scanned, text = explain(url, sql, args)
            plans.append((label, text))
            print(f"| {label} | {len(scanned)} | {ms:,.1f} |", flush=True)
        print("\nplan of the one-day totals (partition pruning: one partition, no default):")
        print(plans[0][1])
        print("\nplan of the one-day listing:")
        print(plans[2][1])
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["convert", "scale"])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LECTR_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the scale database")
    args = parser.parse_args()
    if args.what == "convert":
        convert(args.database_url, args.rows or 5_000_000)
    else:
        scale(args.database_url, args.rows or 50_000_000, args.days, args.keep)


if __name__ == "__main__":
    main()
