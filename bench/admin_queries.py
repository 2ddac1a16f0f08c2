"""The admin API's request-log and usage queries on a production-sized
database: their plans and timings.

    .venv/bin/python bench/admin_queries.py [--rows 5000000] [--days 90] [--runs 7]
        [--width week|day] [--keep] [--reuse] [--plans] [--only NAME,...]

Creates the scratch database ``lectr_scale`` (the role needs CREATEDB), runs
the migrations, makes the request-log partitions the partition job would have
made over ``--days`` (a week each: the default retention; ``--width day``:
a retention of 1 to 92 days), and loads ``--rows`` request_logs rows up to
now in time order, in transactions of 500 rows' worth of txids (as the
recorder's batches): 200 orgs, one with 40 % of the rows and the others on a
power law (the smallest has a few thousand), 1 to 20 Lectr keys per org
(plus a rarely used one), three providers (one used for 0.5 % of the
requests), ten models, about 4 % errors, realistic row widths (the
provider's usage object, a response model). Then the hourly rollups, as the
recorder writes them (one row per org, hour, provider, model and key, stored
in hour order), and ``VACUUM ANALYZE``.

Every statement is built by the store's own SQL builders
(``lectr.storage.request_logs``), with the parameters the admin API passes
for: the big org and a small one, filters that match much, little and
nothing, deep pages, live cursors a poll and a day old, the usage totals by
every grouping, the per-org totals of the dashboard's org list (this month)
and of ``GET /admin/usage`` (the last 30 days). Each case runs ``--runs``
times (median, after a warm-up), then once under ``EXPLAIN (ANALYZE,
BUFFERS)``: the table gives the rows returned, the rows the scans read
(returned + removed by a filter), the buffers touched, and the planning
time. ``--plans`` prints every plan. The database is dropped at the end
unless ``--keep`` (then ``--reuse`` measures it again without loading).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2

from lectr.db.migrate import upgrade_sync
from lectr.storage import request_logs as rl
from lectr.storage.request_logs import RequestFilter
from tests.support.pg import admin_execute, with_database

NAME = "lectr_scale"
ORGS = 200
BIG = 0  # the org with 40 % of the rows
SMALL = 150  # a small org (about 0.1 %)
BATCH = 500  # rows per storing transaction (the recorder's batch)
_OPTIONS = rl._PARTITION_OPTIONS


def org_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def key_id(org: int, k: int) -> str:
    return f"00000000-0000-4000-a000-{org * 64 + k:012x}"


def keys_of(org: int) -> int:
    return 20 if org == BIG else 1 + org % 6


#: a uniform number in [0, 1) from the row number and a salt
def _r(salt: int) -> str:
    return f"((hashint8extended(g, {salt}) & 1048575)::float8 / 1048576)"


# One row per g: the org (40 % the big one, the rest on a power law), its key
# (the first ones busiest; 0.02 % on a rare extra key), provider and model,
# status, tokens and cost. Columns computed once in the inner select.
_LOAD_SQL = f"""
INSERT INTO request_logs (request_id, created_at, org_id, key_id, provider, model, method, path,
    status, latency_ms, ttfb_ms, streamed, prompt_tokens, completion_tokens, total_tokens,
    cached_tokens, cache_creation_tokens, usage_source, error_type, reasoning_tokens,
    response_model, usage_raw, cost_usd, price_basis_id, provider_key_id, attempts, txid)
SELECT gen_random_uuid(), created_at, ('00000000-0000-4000-8000-' || lpad(to_hex(org), 12, '0'))::uuid,
    ('00000000-0000-4000-a000-' || lpad(to_hex(org * 64 + k), 12, '0'))::uuid,
    provider, model, 'POST',
    CASE provider WHEN 'anthropic' THEN '/v1/messages' ELSE '/v1/chat/completions' END,
    status, 200 + r6 * 4000, CASE WHEN streamed THEN 150 + r6 * 800 END, streamed,
    CASE WHEN metered THEN prompt END, CASE WHEN metered THEN completion END,
    CASE WHEN metered THEN prompt + completion END, CASE WHEN metered THEN cached END,
    CASE WHEN metered THEN 0 END,
    CASE WHEN status = 200 THEN CASE WHEN r6 < 0.02 THEN 'estimated' ELSE 'provider' END
         ELSE 'none' END,
    CASE WHEN status = 429 THEN 'rate_limited' WHEN status >= 500 THEN 'upstream_error'
         WHEN status = 499 THEN 'client_closed' WHEN status >= 400 THEN 'invalid_request' END,
    CASE WHEN metered AND model LIKE 'o4%%' THEN completion / 2 END,
    CASE WHEN metered THEN model || '-2025-08-07' END,
    CASE WHEN metered THEN json_build_object('prompt_tokens', prompt,
        'completion_tokens', completion, 'total_tokens', prompt + completion,
        'prompt_tokens_details', json_build_object('cached_tokens', cached, 'audio_tokens', 0),
        'completion_tokens_details', json_build_object('reasoning_tokens', 0,
        'audio_tokens', 0, 'accepted_prediction_tokens', 0,
        'rejected_prediction_tokens', 0))::text END,
    CASE WHEN metered AND model <> 'gemini-2.5-pro'
         THEN round((prompt * 0.15 + completion * 0.6) / 1000000, 9) END,
    CASE WHEN metered AND model <> 'gemini-2.5-pro' THEN hashtext(model)::bigint END,
    ('00000000-0000-4000-b000-' || lpad(to_hex(org * 4 + (g %% 2)::int), 12, '0'))::uuid,
    1, %(txid0)s + g / {BATCH}
FROM (
    SELECT g, created_at, org, k, provider, status, streamed, prompt, completion, cached, r6,
        status = 200 AS metered,
        CASE WHEN r4 < 0.002 THEN NULL
             WHEN provider = 'openai' THEN (ARRAY['gpt-4o-mini', 'gpt-4o', 'gpt-4.1',
                'o4-mini', 'text-embedding-3-small'])[1 + floor(5 * r4 ^ 2)::int]
             WHEN provider = 'anthropic' THEN (ARRAY['claude-sonnet-4-5', 'claude-haiku-4-5',
                'claude-opus-4-1'])[1 + floor(3 * r4 ^ 2)::int]
             ELSE (ARRAY['gemini-2.5-flash', 'gemini-2.5-pro'])[1 + floor(2 * r4)::int] END
            AS model
    FROM (
        SELECT g, r6, org,
            %(start)s::timestamptz + (g - 1 + r5) / %(rows)s * %(span)s::interval AS created_at,
            CASE WHEN r2 < 0.0002 THEN nkeys ELSE floor(nkeys * r2 ^ 3)::int END AS k,
            CASE WHEN r3 < 0.66 THEN 'openai' WHEN r3 < 0.995 THEN 'anthropic'
                 ELSE 'gemini' END AS provider,
            CASE WHEN r5 < 0.96 THEN 200 WHEN r5 < 0.975 THEN 429 WHEN r5 < 0.985 THEN 500
                 WHEN r5 < 0.99 THEN 400 WHEN r5 < 0.995 THEN 499 WHEN r5 < 0.997 THEN 502
                 ELSE 401 END AS status,
            r6 < 0.6 AS streamed,
            100 + floor(r4 * 6000)::int AS prompt, 10 + floor(r6 * 1200)::int AS completion,
            CASE WHEN r2 < 0.3 THEN floor(r4 * 4000)::int ELSE 0 END AS cached, r4
        FROM (
            SELECT g, r2, r3, r4, r5, r6, org,
                CASE WHEN org = 0 THEN 20 ELSE 1 + org %% 6 END AS nkeys
            FROM (
                SELECT g, {_r(2)} AS r2, {_r(3)} AS r3, {_r(4)} AS r4, {_r(5)} AS r5,
                    {_r(6)} AS r6,
                    CASE WHEN {_r(1)} < 0.4 THEN 0
                         ELSE 1 + floor(199 * ((({_r(1)} - 0.4) / 0.6) ^ 3))::int END AS org
                FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
            ) a
        ) b
    ) c
) d
"""

# the rollups of every stored row, stored in the order the recorder adds
# them: a rollup row is inserted by the first batch of its hour that has a
# request of its org, provider, model and key (later ones update it in place)
_ROLLUPS_SQL = rl.ROLLUPS_FROM_ROWS_SQL + " ORDER BY 2, min(created_at)"


def _floor(t: datetime, width: timedelta) -> datetime:
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday()) if width == timedelta(days=7) else day


def build(url: str, rows: int, days: int, width: timedelta, end: datetime) -> None:
    upgrade_sync(url)
    start = end - timedelta(days=days)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    # the partitions the job would have made: drop the migration's (empty)
    # ones and cover [start, end + 2 weeks) with the chosen width
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'request_logs'::regclass AND c.relname <> %s",
        (rl.DEFAULT_PARTITION,),
    )
    for (name,) in cur.fetchall():
        cur.execute(f"DROP TABLE {name}")
    t = _floor(start, width)
    while t < end + timedelta(days=14):
        cur.execute(
            f"CREATE TABLE request_logs_p{t:%Y%m%d} PARTITION OF request_logs "
            f"FOR VALUES FROM (%s) TO (%s) WITH ({_OPTIONS})",
            (t, t + width),
        )
        t += width
    # txids for the rows' batches, all before any snapshot taken from now on
    batches = rows // BATCH + 2
    cur.execute("SELECT pg_current_xact_id()::text::bigint")
    (txid0,) = cur.fetchone()
    cur.execute("CREATE TEMP TABLE burn (x int)")
    cur.execute(
        "DO $$ BEGIN FOR i IN 1..%s LOOP BEGIN INSERT INTO burn VALUES (i); "
        "EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$",
        (batches,),
    )
    cur.execute("SET synchronous_commit = off")
    chunk = 250_000
    started = time.perf_counter()
    for first in range(1, rows + 1, chunk):
        last = min(first + chunk - 1, rows)
        cur.execute(
            _LOAD_SQL,
            {
                "first": first,
                "last": last,
                "rows": rows,
                "start": start,
                "span": f"{days} days",
                "txid0": txid0 + 1,
            },
        )
        print(
            f"  {last:,} rows ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True
        )
    cur.execute(_ROLLUPS_SQL)
    cur.execute("SET maintenance_work_mem = '512MB'")
    cur.execute("VACUUM ANALYZE request_logs")
    cur.execute("VACUUM ANALYZE usage_hourly")
    cur.execute(
        "SELECT count(*), count(*) FILTER (WHERE org_id = %s), "
        "count(*) FILTER (WHERE org_id = %s) FROM request_logs",
        (org_id(BIG), org_id(SMALL)),
    )
    n, big, small = cur.fetchone()
    cur.execute("SELECT count(*) FROM usage_hourly")
    (hourly,) = cur.fetchone()
    cur.execute("SELECT pg_size_pretty(pg_total_relation_size('usage_hourly'))")
    (hourly_size,) = cur.fetchone()
    cur.execute(
        "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits "
        "WHERE inhparent = 'request_logs'::regclass"
    )
    (size,) = cur.fetchone()
    print(
        f"loaded {n:,} rows ({size} with indexes) in {time.perf_counter() - started:.0f} s: "
        f"big org {big:,}, small org {small:,}; usage_hourly {hourly:,} rows ({hourly_size})",
        flush=True,
    )
    conn.close()


@dataclass
class Case:
    name: str
    what: str
    sql: str
    args: list
    snapshot: bool = False  # run in a REPEATABLE READ transaction (the live view)


def cases(cur, end: datetime, days: int) -> list[Case]:
    """The statements the admin API runs, with realistic parameters."""
    big, small = org_id(BIG), org_id(SMALL)

    def one(sql: str, *args) -> tuple:
        cur.execute(sql, args)
        return cur.fetchone()

    page = 51  # the default page of 50, plus one to know there are more
    f = RequestFilter
    out: list[Case] = []

    def recent(name, what, org, where=f(), before=None):
        out.append(Case(name, what, *rl.recent_sql(org, page, before, where)))

    def position(org: str, at: datetime) -> tuple[datetime, int]:
        return one(
            "SELECT created_at, id FROM request_logs WHERE org_id = %s AND created_at <= %s "
            "ORDER BY created_at DESC, id DESC LIMIT 1",
            org,
            at,
        )

    rare_key = key_id(BIG, keys_of(BIG))  # 0.02 % of the big org's rows
    unused_key = key_id(BIG, 63)  # a key without requests
    day = timedelta(days=1)
    recent("list.big", "big org, first page", big)
    recent("list.small", "small org, first page", small)
    recent("list.big.provider_much", "big org, provider=openai (66 %)", big, f(provider="openai"))
    recent(
        "list.big.provider_little", "big org, provider=gemini (0.5 %)", big, f(provider="gemini")
    )
    recent("list.big.provider_none", "big org, provider=azure (none)", big, f(provider="azure"))
    recent("list.big.model_much", "big org, model=gpt-4o-mini", big, f(model="gpt-4o-mini"))
    recent("list.big.model_little", "big org, model=gemini-2.5-pro", big, f(model="gemini-2.5-pro"))
    recent("list.big.model_none", "big org, model=unknown", big, f(model="gpt-5-nano"))
    recent("list.big.key_much", "big org, its busiest key", big, f(key_id=key_id(BIG, 0)))
    recent("list.big.key_little", "big org, a rare key (0.02 %)", big, f(key_id=rare_key))
    recent("list.big.key_none", "big org, a key without requests", big, f(key_id=unused_key))
    recent("list.small.key", "small org, its second key", small, f(key_id=key_id(SMALL, 1)))
    recent("list.big.status_ok", "big org, status=200", big, f(status_min=200, status_max=200))
    recent("list.big.errors", "big org, status=error", big, f(status_min=400))
    recent("list.big.5xx", "big org, status=5xx", big, f(status_min=500, status_max=599))
    recent("list.big.401", "big org, status=401 (0.3 %)", big, f(status_min=401, status_max=401))
    recent(
        "list.big.day",
        "big org, since/until one day 45 days ago",
        big,
        f(since=end - 45 * day, until=end - 44 * day),
    )
    recent("list.big.until_old", "big org, until 80 days ago", big, f(until=end - 80 * day))
    recent(
        "list.big.key_week",
        "big org, rare key, last 7 days",
        big,
        f(key_id=rare_key, since=end - 7 * day),
    )
    recent("list.big.deep", "big org, page 60 days back", big, before=position(big, end - 60 * day))
    recent(
        "list.small.deep",
        "small org, page 60 days back",
        small,
        before=position(small, end - 60 * day),
    )
    recent(
        "list.big.deep_key",
        "big org, rare key, page 60 days back",
        big,
        f(key_id=rare_key),
        position(big, end - 60 * day),
    )

    # live views: a snapshot as of a poll 5 s ago and as of a day ago (a tab
    # left open); rows of txid >= x are those it cannot see
    def snapshot_at(at: datetime) -> str:
        (x,) = one("SELECT max(txid) + 1 FROM request_logs WHERE created_at <= %s", at)
        return f"{x}:{x}:"

    recent_snap = snapshot_at(end - timedelta(minutes=1))
    day_snap = snapshot_at(end - day)
    for name, what, org, snap, where in (
        ("live.big", "big org, poll a minute on", big, recent_snap, f()),
        ("live.small", "small org, poll a minute on", small, recent_snap, f()),
        ("live.big.day", "big org, cursor a day old", big, day_snap, f()),
        ("live.small.day", "small org, cursor a day old", small, day_snap, f()),
        (
            "live.big.day_key_none",
            "big org, day-old cursor, unused key",
            big,
            day_snap,
            f(key_id=unused_key),
        ),
    ):
        out.append(Case(name, what, *rl.newer_sql(org, snap, None, page - 1, where), snapshot=True))
    xmin = int(day_snap.split(":")[0])
    after = one(
        "SELECT txid, id FROM request_logs WHERE org_id = %s AND txid >= %s "
        "ORDER BY txid, id OFFSET 200 LIMIT 1",
        big,
        xmin,
    )
    out.append(
        Case(
            "live.big.chain",
            "big org, day-old cursor, 5th page",
            *rl.newer_sql(big, day_snap, after, page - 1, f()),
            snapshot=True,
        )
    )
    (legacy,) = one(
        "SELECT min(id) FROM request_logs WHERE created_at >= %s", end - timedelta(hours=1)
    )
    for name, org in (("live_legacy.big", big), ("live_legacy.small", small)):
        out.append(
            Case(
                name,
                f"{'big' if org == big else 'small'} org, a pre-0009 cursor an hour old",
                *rl.newer_than_id_sql(org, legacy, page - 1, f()),
                snapshot=True,
            )
        )

    (request_id,) = one("SELECT request_id FROM request_logs WHERE org_id = %s LIMIT 1", small)
    out.append(
        Case(
            "get",
            "one request by id",
            f"SELECT {', '.join('r.' + c for c in rl._SELECT_COLUMNS.split(', '))}, b.basis "
            "FROM request_logs r LEFT JOIN price_bases b ON b.id = r.price_basis_id "
            "WHERE r.request_id = %s",
            [request_id],
        )
    )

    # usage totals, over the range the API gives (whole hours)
    until = end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    month = until.replace(day=1, hour=0)
    for group_by, span in (
        ("model", 30),
        ("provider", 30),
        ("key", 30),
        ("day", days),
        ("hour", 31),
        ("model", 366),
    ):
        for label, org in (("big", big), ("small", small)):
            out.append(
                Case(
                    f"usage.{label}.{group_by}.{span}d",
                    f"{label} org, by {group_by}, {span} days",
                    *rl.totals_sql(org, until - span * day, until, group_by, 1000),
                )
            )
    everyone = [org_id(i) for i in range(ORGS)]
    for name, what, orgs, since in (
        ("orgs_usage.all.month", "every org, this month (org list)", None, month),
        (
            "orgs_usage.all.30d",
            "every org, last 30 days (GET /admin/usage)",
            None,
            until - 30 * day,
        ),
        ("orgs_usage.all.366d", "every org, 366 days", None, until - 366 * day),
        ("orgs_usage.member.month", "3 orgs (a member), this month", everyone[:3], month),
        ("orgs_usage.200ids.30d", "200 org ids, last 30 days", everyone, until - 30 * day),
    ):
        out.append(Case(name, what, *rl.totals_by_org_sql(orgs, since, until)))
    return out


def _walk(node: dict, visit: Callable[[dict], None]) -> None:
    visit(node)
    for child in node.get("Plans", ()):
        _walk(child, visit)


def measure(url: str, runs: int, plans: bool, only: set[str] | None) -> list[dict]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    (end,) = one_value(cur, "SELECT max(created_at) FROM request_logs")
    (first,) = one_value(cur, "SELECT min(created_at) FROM request_logs")
    days = round((end - first) / timedelta(days=1))
    results = []
    for case in cases(cur, end, days):
        if only and not any(case.name.startswith(o) for o in only):
            continue
        sql = cur.mogrify(case.sql, case.args).decode()

        def run(statement: str, case: Case = case) -> list:
            if case.snapshot:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute(statement)
            rows = cur.fetchall()
            if case.snapshot:
                cur.execute("COMMIT")
            return rows

        run(sql)  # warm-up
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            returned = run(sql)
            times.append((time.perf_counter() - started) * 1000)
        (plan,) = run("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)[0][0]
        read = 0

        def scans(node: dict) -> None:
            nonlocal read
            if "Scan" in node["Node Type"]:
                loops = node.get("Actual Loops", 1)
                read += (
                    node.get("Actual Rows", 0)
                    + node.get("Rows Removed by Filter", 0)
                    + node.get("Rows Removed by Index Recheck", 0)
                ) * loops

        _walk(plan["Plan"], scans)
        top = plan["Plan"]
        result = {
            "name": case.name,
            "what": case.what,
            "rows": len(returned),
            "read": read,
            "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
            "plan_ms": plan.get("Planning Time", 0.0),
            "exec_ms": plan.get("Execution Time", 0.0),
            "median_ms": statistics.median(times),
        }
        results.append(result)
        print(
            f"{case.name:<28} {result['rows']:>5} rows {read:>10,} read {result['buffers']:>8,} "
            f"buf  plan {result['plan_ms']:6.2f} ms  median {result['median_ms']:8.2f} ms"
            f"   ({case.what})",
            flush=True,
        )
        if plans:
            text = run("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            print("    " + "\n    ".join(r[0] for r in text), flush=True)
    conn.close()
    return results


def one_value(cur, sql: str, *args) -> tuple:
    cur.execute(sql, args)
    return cur.fetchone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LECTR_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--width", choices=("week", "day"), default="week")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="measure the kept database")
    parser.add_argument("--plans", action="store_true", help="print every plan")
    parser.add_argument("--only", help="comma-separated case name prefixes")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    url = with_database(args.database_url, NAME)
    if not args.reuse:
        admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        admin_execute(args.database_url, f'CREATE DATABASE "{NAME}"')
    try:
        if not args.reuse:
            width = timedelta(days=7 if args.width == "week" else 1)
            build(url, args.rows, args.days, width, datetime.now(UTC))
        else:
            upgrade_sync(url)  # (a new index migration, measured on the same rows)
            admin_execute(url, "ANALYZE request_logs")
        only = set(args.only.split(",")) if args.only else None
        results = measure(url, args.runs, args.plans, only)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            admin_execute(args.database_url, f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')


if __name__ == "__main__":
    main()
