"""How many usage rows per second the recorder's flusher sustains into
PostgreSQL (rows, their price bases and their hourly rollups, in one
transaction per batch), and what ``record()`` costs the request path.

    .venv/bin/python bench/flusher_bench.py [--database-url URL] [--rows 200000]
                                            [--batch-size 500] [--statement-rows 2000]
                                            [--parallel 2] [--prefill 0]

Creates a scratch database on the server (the role needs CREATEDB), runs the
migrations, feeds ``--rows`` rows to a real UsageRecorder on the real
reactor as fast as the reactor allows (yielding between slices so the
flusher runs, as it would between requests), waits until every row is
committed, prints the figures and drops the database. ``--prefill`` first
loads that many rows, to measure inserts into a table with millions of rows
(index maintenance grows with the table).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task

from lectr.db.database import Database
from lectr.db.migrate import upgrade_sync
from lectr.metrics import Registry
from lectr.pricing.manager import PricingManager
from lectr.storage.request_logs import ROLLUPS_FROM_ROWS_SQL, RequestLogStore
from lectr.usage.model import Usage, UsageRecord
from lectr.usage.recorder import UsageRecorder
from tests.support.pg import admin_execute, with_database

ROLLUP_CHECK_SQL = (
    "SELECT (SELECT sum(requests) FROM usage_hourly) = (SELECT count(*) FROM request_logs) "
    "AND (SELECT sum(cost_usd) FROM usage_hourly) = (SELECT sum(cost_usd) FROM request_logs)"
)
ORGS = [str(uuid.uuid4()) for _ in range(20)]
KEYS = [str(uuid.uuid4()) for _ in range(40)]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "text-embedding-3-small"]


def make_rows(n: int) -> list[UsageRecord]:
    """Priced as the proxy prices them (cost and basis), arriving in time
    order over the last ``n`` x 20 ms (200,000 rows: a bit over an hour, so
    the rollups of two hours are kept)."""
    now = datetime.now(UTC)
    pricing = PricingManager(None, reactor=None, metrics=Registry())
    rows = [
        UsageRecord(
            request_id=str(uuid.uuid4()),
            created_at=now - timedelta(milliseconds=20 * (n - i)),
            org_id=ORGS[i % len(ORGS)],
            key_id=KEYS[i % len(KEYS)],
            provider="anthropic" if i % 4 == 2 else "openai",
            model=MODELS[i % len(MODELS)],
            method="POST",
            path="/v1/chat/completions",
            status=200 if i % 50 else 429,
            latency_ms=812.25,
            ttfb_ms=95.5,
            streamed=bool(i % 2),
            usage=Usage(
                1200,
                350,
                1550,
                1024,
                None,
                "provider",
                0,
                None,
                '{"prompt_tokens":1200,"completion_tokens":350,"total_tokens":1550}',
                MODELS[i % len(MODELS)],
            ),  # fmt: skip
        )
        for i in range(n)
    ]
    return [pricing.price_record(r) for r in rows]


def prefill(url: str, n: int) -> None:
    if not n:
        return
    started = time.perf_counter()
    admin_execute(
        url,
        """
        INSERT INTO request_logs (request_id, created_at, org_id, provider, model, method,
            path, status, latency_ms, streamed, prompt_tokens, completion_tokens,
            total_tokens, usage_source)
        SELECT gen_random_uuid(), now() - (g %% 2592000) * interval '1 second',
               ('00000000-0000-4000-8000-0000000000' || lpad((g %% 20)::text, 2, '0'))::uuid,
               'openai', 'gpt-4o-mini', 'POST', '/v1/chat/completions', 200, 500, false,
               100, 50, 150, 'provider'
        FROM generate_series(1, %s) g
        """,
        (n,),
    )
    admin_execute(url, ROLLUPS_FROM_ROWS_SQL)  # (so that the check at the end covers them too)
    admin_execute(url, "VACUUM ANALYZE request_logs")
    print(f"prefilled {n} rows in {time.perf_counter() - started:.1f}s", flush=True)


async def run(
    reactor, url: str, rows: int, batch_size: int, statement_rows: int, parallel: int
) -> None:
    db = Database(url, reactor=reactor, min_size=2, max_size=4)
    await db.start()
    metrics = Registry()
    with tempfile.TemporaryDirectory() as data_dir:
        recorder = UsageRecorder(
            RequestLogStore(db),
            reactor=reactor,
            data_dir=Path(data_dir),
            metrics=metrics,
            batch_size=batch_size,
            statement_rows=statement_rows,
            parallel=parallel,
            max_buffer=max(batch_size * 400, 200_000),
        )
        await recorder.start()
        data = make_rows(rows)
        written = metrics.get("lectr_usage_rows_written_total")
        record_seconds = 0.0
        started = time.perf_counter()
        slice_size = 1000
        for i in range(0, rows, slice_size):
            t = time.perf_counter()
            for r in data[i : i + slice_size]:
                recorder.record(r)
            record_seconds += time.perf_counter() - t
            await task.deferLater(reactor, 0)  # let the flusher and the database run
        while written.value() < rows:
            await task.deferLater(reactor, 0.005)
        elapsed = time.perf_counter() - started
        spilled = metrics.get("lectr_usage_rows_spilled_total").value()
        batches = metrics.get("lectr_usage_flush_seconds").count()
        await recorder.stop()
    await db.close()
    print(
        f"flusher: {rows} rows in {elapsed:.2f}s = {rows / elapsed:,.0f} rows/s sustained "
        f"({batches:.0f} statements of <= {statement_rows} rows, {parallel} at a time, a flush "
        f"started at {batch_size} buffered; {spilled:.0f} spilled)"
    )
    print(f"record(): {record_seconds / rows * 1e6:.2f} us per call on the reactor thread")
    print(
        f"rollup rows: {admin_execute(url, 'SELECT count(*) FROM usage_hourly')[0][0]}, "
        f"rollups equal the rows: "
        f"{admin_execute(url, ROLLUP_CHECK_SQL)[0][0]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LECTR_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
        help="a PostgreSQL server URL whose role may CREATE DATABASE",
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=500, help="rows that start a flush")
    parser.add_argument("--statement-rows", type=int, default=2000, help="most rows per INSERT")
    parser.add_argument("--parallel", type=int, default=2, help="statements in flight at once")
    parser.add_argument("--prefill", type=int, default=0, help="rows loaded before measuring")
    args = parser.parse_args()

    name = f"lectr_bench_{os.getpid()}"
    admin_execute(args.database_url, f'CREATE DATABASE "{name}"')
    url = with_database(args.database_url, name)
    try:
        upgrade_sync(url)
        prefill(url, args.prefill)
        task.react(
            lambda reactor: defer.ensureDeferred(
                run(reactor, url, args.rows, args.batch_size, args.statement_rows, args.parallel)
            )
        )
    finally:
        admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
