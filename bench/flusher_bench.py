"""How many usage rows per second the recorder's flusher sustains into
PostgreSQL (rows, their price bases and their hourly rollups, in one
transaction per batch), and what ``record()`` costs the request path.

    .venv/bin/python bench/flusher_bench.py [--database-url URL] [--rows 200000]
                                            [--batch-size N] [--statement-rows N]
                                            [--parallel N] [--prefill 0] [--rate 0]

Creates a scratch database on the server (the role needs CREATEDB), runs the
migrations, feeds ``--rows`` rows to a real UsageRecorder on the real
reactor as fast as the reactor allows (yielding between slices so the
flusher runs, as it would between requests), waits until every row is
committed, prints the figures and drops the database. ``--prefill`` first
loads that many rows, to measure inserts into a table with millions of rows
(index maintenance grows with the table).

``--rate R`` feeds the rows at R per second instead (as a proxy serving R
requests a second would), so the statements have the sizes the flusher gives
them at that rate, and prints the CPU per row of this process (the
recorder's work on the reactor) and of the PostgreSQL server (every
postgres process on this machine: run it on a quiet server). The batch
options default to the recorder's own defaults.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench_run  # bench/run.py: PostgreSQL's CPU time
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
                prompt_tokens=1200,
                completion_tokens=350,
                total_tokens=1550,
                cached_tokens=1024,
                source="provider",
                reasoning_tokens=0,
                raw='{"prompt_tokens":1200,"completion_tokens":350,"total_tokens":1550}',
                model=MODELS[i % len(MODELS)],
            ),
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


async def run(reactor, url: str, rows: int, options: dict, rate: float) -> None:
    db = Database(url, reactor=reactor, min_size=2, max_size=4)
    await db.start()
    metrics = Registry()
    with tempfile.TemporaryDirectory() as data_dir:
        recorder = UsageRecorder(
            RequestLogStore(db),
            reactor=reactor,
            data_dir=Path(data_dir),
            metrics=metrics,
            max_buffer=max(options.get("batch_size", 1_000) * 400, 200_000),
            **options,
        )
        await recorder.start()
        data = make_rows(rows)
        written = metrics.get("lectr_usage_rows_written_total")
        record_seconds = 0.0
        started = time.perf_counter()
        cpu_started = time.process_time(), bench_run.database_cpu()
        fed = 0
        while fed < rows:
            # at a rate: what is due by now, then a 5 ms sleep; at once: 1,000
            # rows, then a turn of the reactor for the flusher and the database
            if rate:
                due = min(rows, int((time.perf_counter() - started) * rate))
            else:
                due = min(rows, fed + 1000)
            t = time.perf_counter()
            for r in data[fed:due]:
                recorder.record(r)
            record_seconds += time.perf_counter() - t
            fed = max(fed, due)
            await task.deferLater(reactor, 0.005 if rate else 0)
        while written.value() < rows:
            await task.deferLater(reactor, 0.005)
        elapsed = time.perf_counter() - started
        own_cpu = time.process_time() - cpu_started[0]
        db_cpu = bench_run.database_cpu_since(cpu_started[1])
        spilled = metrics.get("lectr_usage_rows_spilled_total").value()
        batches = metrics.get("lectr_usage_flush_seconds").count()
        await recorder.stop()
    await db.close()
    settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "the recorder's defaults"
    print(
        f"flusher: {rows} rows in {elapsed:.2f}s = {rows / elapsed:,.0f} rows/s "
        f"{f'fed at {rate:,.0f}/s' if rate else 'sustained'} ({batches:.0f} flushes, "
        f"{rows / max(batches, 1):.0f} rows each; {settings}; {spilled:.0f} spilled)"
    )
    print(
        f"CPU per row: this process {own_cpu / rows * 1e6:.1f} us (recorder and rows), "
        f"PostgreSQL {db_cpu / rows * 1e6:.1f} us"
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
    parser.add_argument("--batch-size", type=int, help="rows that start a flush")
    parser.add_argument("--statement-rows", type=int, help="most rows per INSERT")
    parser.add_argument("--parallel", type=int, help="statements in flight at once")
    parser.add_argument("--prefill", type=int, default=0, help="rows loaded before measuring")
    parser.add_argument("--rate", type=float, default=0, help="rows fed per second (0: at once)")
    args = parser.parse_args()
    if args.rows < 1 or not args.rate >= 0:
        parser.error("need --rows >= 1 and --rate >= 0")
    options = {
        name: value
        for name in ("batch_size", "statement_rows", "parallel")
        if (value := getattr(args, name)) is not None
    }

    name = f"lectr_bench_{os.getpid()}"
    admin_execute(args.database_url, f'CREATE DATABASE "{name}"')
    url = with_database(args.database_url, name)
    try:
        upgrade_sync(url)
        prefill(url, args.prefill)
        task.react(
            lambda reactor: defer.ensureDeferred(run(reactor, url, args.rows, options, args.rate))
        )
    finally:
        admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
