"""The admin API's request-log and usage queries read what they return, not
the whole org (migration 0010; bench/admin_queries.py measures them on
millions of rows): checked on the plans PostgreSQL actually runs over a
moderate dataset, and the listings' answers checked against a plain
filter-and-sort of the same rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.storage import request_logs as rl
from lectr.storage.request_logs import RequestFilter

BIG = "00000000-0000-4000-8000-000000000000"
SMALL = "00000000-0000-4000-8000-000000000001"
ROWS = 24_000
DAYS = 28
# The dataset ends at the last Thursday noon (UTC) before now, not at now: the
# weekly partitions then always hold the same share of it. Ending at now, on a
# Sunday evening (or a Monday morning) the oldest (or newest) partition held a
# few hours of rows, which the planner rightly reads whole rather than through
# an index - more rows than a page, so the bounds below failed at those hours.
_NOW = datetime.now(UTC).replace(microsecond=0)
END = (_NOW - timedelta(days=(_NOW.weekday() - 3) % 7)).replace(hour=12, minute=0, second=0)
if END > _NOW:
    END -= timedelta(days=7)
KEYS = [f"00000000-0000-4000-a000-{k:012x}" for k in range(6)]
RARE_KEY = KEYS[5]  # 0.1 % of the rows
UNUSED_KEY = "00000000-0000-4000-a000-0000000000ff"
PAGE = 51


def _monday(t: datetime) -> datetime:
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


@pytest.fixture(scope="module")
def scale_url(pg_server):
    """A migrated database with weekly partitions over DAYS and ROWS rows:
    the big org 80 %, its keys, providers (gemini 0.5 %) and statuses
    skewed, plus their hourly rollups, analyzed."""
    name, url = pg_server.create_database()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    start = END - timedelta(days=DAYS)
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'request_logs'::regclass AND c.relname <> %s",
        (rl.DEFAULT_PARTITION,),
    )
    for (table,) in cur.fetchall():
        cur.execute(f"DROP TABLE {table}")
    week = _monday(start)
    while week < END + timedelta(days=7):
        cur.execute(
            f"CREATE TABLE request_logs_p{week:%Y%m%d} PARTITION OF request_logs "
            f"FOR VALUES FROM (%s) TO (%s) WITH ({rl._PARTITION_OPTIONS})",
            (week, week + timedelta(days=7)),
        )
        week += timedelta(days=7)
    cur.execute(
        """
        INSERT INTO request_logs (request_id, created_at, org_id, key_id, provider, model,
            method, path, status, latency_ms, streamed, prompt_tokens, completion_tokens,
            total_tokens, usage_source, cost_usd)
        SELECT gen_random_uuid(), %(start)s::timestamptz + (g - 1 + r) / %(rows)s
                   * %(days)s * interval '1 day',
               CASE WHEN g %% 5 = 0 THEN %(small)s::uuid ELSE %(big)s::uuid END,
               CASE WHEN g %% 1000 = 7 THEN %(rare)s::uuid
                    ELSE (%(keys)s::uuid[])[1 + (g * 7 %% 23) %% 5] END,
               CASE WHEN g %% 200 = 3 THEN 'gemini' WHEN g %% 3 = 0 THEN 'anthropic'
                    ELSE 'openai' END,
               CASE WHEN g %% 97 = 0 THEN NULL ELSE 'model-' || (g %% 4) END,
               'POST', '/v1/chat/completions',
               CASE WHEN g %% 31 = 0 THEN 429 WHEN g %% 53 = 0 THEN 500 ELSE 200 END,
               100, g %% 2 = 0, 10, 5, 15, 'provider', 0.0001
        FROM (SELECT g, (hashint8(g) & 1023)::float8 / 1024 AS r
              FROM generate_series(1, %(rows)s) g) s
        """,
        {
            "start": start,
            "rows": ROWS,
            "days": DAYS,
            "big": BIG,
            "small": SMALL,
            "rare": RARE_KEY,
            "keys": KEYS[:5],
        },
    )
    cur.execute(rl.ROLLUPS_FROM_ROWS_SQL + " ORDER BY 2, min(created_at)")
    cur.execute("VACUUM ANALYZE request_logs")
    cur.execute("VACUUM ANALYZE usage_hourly")
    conn.close()
    yield url
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def cur(scale_url):
    conn = psycopg2.connect(scale_url)
    conn.autocommit = True
    try:
        yield conn.cursor()
    finally:
        conn.close()


def _rows_read(cur, sql: str, args: list) -> tuple[int, int]:
    """(rows returned, rows the plan's scans read: returned by a scan or
    removed by its filter), from EXPLAIN ANALYZE."""
    cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, args)
    (plan,) = cur.fetchone()[0]
    read = 0

    def walk(node: dict) -> None:
        nonlocal read
        if "Scan" in node["Node Type"]:
            read += (
                node.get("Actual Rows", 0)
                + node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0)
            ) * node.get("Actual Loops", 1)
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan["Plan"])
    return plan["Plan"]["Actual Rows"], read


def _count(cur, sql: str, *args) -> int:
    cur.execute(sql, args)
    return cur.fetchone()[0]


@pytest.mark.parametrize(
    "where",
    [
        RequestFilter(key_id=UNUSED_KEY),
        RequestFilter(key_id=RARE_KEY),
        RequestFilter(provider="azure"),
        RequestFilter(provider="gemini"),
        RequestFilter(key_id=RARE_KEY, since=END - timedelta(days=7)),
    ],
    ids=["key-none", "key-rare", "provider-none", "provider-rare", "key-rare-week"],
)
def test_filtered_listing_reads_about_what_it_returns(cur, where):
    """A key or provider filter that matches few of the org's rows used to
    walk all of them (the busy org here: 19,200 rows for one page)."""
    sql, args = rl.recent_sql(BIG, PAGE, None, where)
    returned, read = _rows_read(cur, sql, args)
    # every partition's scan may read one row past the page
    assert read <= returned + 2 * PAGE, (returned, read)


def test_filtered_deep_page_reads_about_what_it_returns(cur):
    before = (END - timedelta(days=20), 2**62)
    sql, args = rl.recent_sql(BIG, PAGE, before, RequestFilter(key_id=RARE_KEY))
    returned, read = _rows_read(cur, sql, args)
    assert read <= returned + 2 * PAGE, (returned, read)


def test_org_totals_read_the_range_not_the_table(cur):
    """The per-org totals (GET /admin/usage, the dashboard's org list for
    this month) filter by hour only: they used to read every rollup row."""
    until = END.replace(minute=0, second=0) + timedelta(hours=1)
    since = until - timedelta(days=1)
    in_range = _count(
        cur, "SELECT count(*) FROM usage_hourly WHERE hour >= %s AND hour < %s", since, until
    )
    total = _count(cur, "SELECT count(*) FROM usage_hourly")
    assert in_range * 10 < total  # (the check below means something)
    sql, args = rl.totals_by_org_sql(None, since, until)
    _, read = _rows_read(cur, sql, args)
    assert read <= 2 * in_range, (in_range, read, total)


_FILTERS = st.builds(
    RequestFilter,
    provider=st.sampled_from([None, "openai", "anthropic", "gemini", "azure"]),
    model=st.sampled_from([None, "model-1", "model-3", "nope"]),
    key_id=st.sampled_from([None, *KEYS, UNUSED_KEY]),
    status_min=st.sampled_from([None, 200, 400, 429, 500]),
    status_max=st.sampled_from([None, 299, 499, 599]),
    since=st.sampled_from([None, END - timedelta(days=3), END - timedelta(days=27)]),
    until=st.sampled_from([None, END - timedelta(days=1), END - timedelta(days=20)]),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    where=_FILTERS,
    org=st.sampled_from([BIG, SMALL]),
    limit=st.integers(1, 60),
    position=st.one_of(st.none(), st.integers(0, ROWS)),
)
def test_listing_answers_are_the_filtered_rows_in_order(cur, where, org, limit, position):
    """Whatever index serves it, a page is the rows matching every filter,
    strictly before the cursor, newest first."""
    before = None
    if position is not None:
        cur.execute(
            "SELECT created_at, id FROM request_logs ORDER BY id OFFSET %s LIMIT 1", (position,)
        )
        before = cur.fetchone()
    sql, args = rl.recent_sql(org, limit, before, where)
    cur.execute(sql, args)
    got = [r[0] for r in cur.fetchall()]

    cur.execute(
        "SELECT id, created_at, key_id, provider, model, status FROM request_logs "
        "WHERE org_id = %s",
        (org,),
    )
    expected = []
    for row_id, created_at, key, provider, model, status in cur.fetchall():
        if before is not None and (created_at, row_id) >= tuple(before):
            continue
        if where.provider is not None and provider != where.provider:
            continue
        if where.model is not None and model != where.model:
            continue
        if where.key_id is not None and key != where.key_id:
            continue
        if where.status_min is not None and status < where.status_min:
            continue
        if where.status_max is not None and status > where.status_max:
            continue
        if where.since is not None and created_at < where.since:
            continue
        if where.until is not None and created_at >= where.until:
            continue
        expected.append((created_at, row_id))
    expected.sort(reverse=True)
    assert got == [row_id for _, row_id in expected[:limit]]
