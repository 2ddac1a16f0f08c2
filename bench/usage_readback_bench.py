"""How fast usage totals read back from the hourly rollups, on a table of
millions of requests.

    .venv/bin/python bench/usage_readback_bench.py [--rows 5000000] [--runs 20]

Creates a scratch database (the role needs CREATEDB), runs the migrations,
loads ``--rows`` request_logs rows over 30 days (20 orgs; the busiest has 60 %
of the rows, 8 models, 10 keys), builds their hourly rollups, then times
``UsageManager.usage_totals`` (through the real pool, as the admin API calls
it) over the whole 30 days of the busiest org, for every grouping, and prints
the median and the slowest run, the query plan, and for comparison the same
totals computed by scanning request_logs. Drops the database at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task

from lectr.db.database import Database
from lectr.db.migrate import upgrade_sync
from lectr.managers.usage import GROUP_BY, UsageManager
from lectr.storage.request_logs import ROLLUPS_FROM_ROWS_SQL, RequestLogStore
from tests.support.pg import admin_execute, with_database

BUSY_ORG = "00000000-0000-4000-8000-00000000b051"
END = datetime(2026, 11, 30, tzinfo=UTC)
DAYS = 30


def load(url: str, rows: int) -> None:
    started = time.perf_counter()
    admin_execute(
        url,
        """
        INSERT INTO request_logs (request_id, created_at, org_id, key_id, provider, model,
            method, path, status, latency_ms, streamed, prompt_tokens, completion_tokens,
            total_tokens, cached_tokens, usage_source, cost_usd)
        SELECT gen_random_uuid(),
               %(end)s::timestamptz - (g::float8 / %(rows)s) * %(days)s * interval '1 day',
               CASE WHEN g %% 5 < 3 THEN %(busy)s::uuid
                    ELSE ('00000000-0000-4000-8000-0000000000'
                          || lpad((g %% 19)::text, 2, '0'))::uuid END,
               ('00000000-0000-4000-8000-00000000000' || (g %% 10)::text)::uuid,
               CASE WHEN g %% 8 < 5 THEN 'openai' WHEN g %% 8 < 7 THEN 'anthropic'
                    ELSE 'gemini' END,
               (ARRAY['gpt-4o-mini', 'gpt-4o', 'gpt-4.1', 'o4-mini', 'text-embedding-3-small',
                      'claude-sonnet-4-5', 'claude-haiku-4-5', 'gemini-2.5-flash'])[g %% 8 + 1],
               'POST', '/v1/chat/completions',
               CASE WHEN g %% 97 = 0 THEN 429 ELSE 200 END,
               250, g %% 2 = 0,
               1000 + g %% 500, 200 + g %% 100, 1200 + g %% 500 + g %% 100, (g %% 3) * 256,
               'provider', ((1000 + g %% 500) * 0.15 + (200 + g %% 100) * 0.6) / 1000000
        FROM generate_series(1, %(rows)s) g
        """,
        {"end": END, "rows": rows, "days": DAYS, "busy": BUSY_ORG},
    )
    loaded = time.perf_counter()
    admin_execute(url, ROLLUPS_FROM_ROWS_SQL)
    admin_execute(url, "VACUUM ANALYZE request_logs")
    admin_execute(url, "VACUUM ANALYZE usage_hourly")
    [(n, busy)] = admin_execute(
        url,
        "SELECT count(*), count(*) FILTER (WHERE org_id = %s) FROM usage_hourly",
        (BUSY_ORG,),
    )
    print(
        f"loaded {rows:,} rows in {loaded - started:.0f}s; rollups built in "
        f"{time.perf_counter() - loaded:.0f}s: {n:,} rollup rows ({busy:,} of the busiest org)",
        flush=True,
    )


async def measure(reactor, url: str, runs: int) -> None:
    db = Database(url, reactor=reactor, min_size=1, max_size=2)
    await db.start()
    manager = UsageManager(RequestLogStore(db))
    since = END - timedelta(days=DAYS)
    try:
        print(f"usage_totals over {DAYS} days of the busiest org ({runs} runs each):")
        for group_by in GROUP_BY:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                report = await manager.usage_totals(
                    BUSY_ORG, since=since, until=END, group_by=group_by
                )
                times.append((time.perf_counter() - started) * 1000)
            requests = sum(t.requests for t in report.items)
            print(
                f"  by {group_by:<8} {len(report.items):>4} groups, {requests:,} requests: "
                f"median {statistics.median(times):6.1f} ms, slowest {max(times):6.1f} ms"
            )
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LECTR_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    name = f"lectr_readback_{os.getpid()}"
    admin_execute(args.database_url, f'CREATE DATABASE "{name}"')
    url = with_database(args.database_url, name)
    try:
        upgrade_sync(url)
        load(url, args.rows)
        task.react(lambda reactor: defer.ensureDeferred(measure(reactor, url, args.runs)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        try:
            plan = admin_execute(
                url,
                "EXPLAIN (ANALYZE, BUFFERS) SELECT nullif(model, ''), sum(requests), "
                "sum(cost_usd) FROM usage_hourly WHERE org_id = %s AND hour >= %s "
                "AND hour < %s GROUP BY 1",
                (BUSY_ORG, END - timedelta(days=DAYS), END),
            )
            print("plan (by model):\n  " + "\n  ".join(r[0] for r in plan))
            started = time.perf_counter()
            admin_execute(
                url,
                "SELECT model, count(*), sum(prompt_tokens), sum(cost_usd) FROM request_logs "
                "WHERE org_id = %s AND created_at >= %s AND created_at < %s GROUP BY 1",
                (BUSY_ORG, END - timedelta(days=DAYS), END),
            )
            print(
                "for comparison, the same totals scanning request_logs: "
                f"{(time.perf_counter() - started) * 1000:.0f} ms"
            )
        finally:
            admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
