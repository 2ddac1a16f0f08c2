"""The request-log partitions on a real database: made ahead of time,
expired whole, one node at a time; rows of the default partition moved or
expired."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from lectr.metrics import Registry
from lectr.storage.request_logs import _RETENTION_LOCK, Partition, RequestLogStore
from lectr.usage.retention import (
    DAY,
    WEEK,
    RequestLogMaintenance,
    partition_width,
    plan_partitions,
)

NOW = datetime(2027, 3, 17, 15, 30, tzinfo=UTC)  # a Wednesday


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- the plan -------------------------------------------------------------------------------


def test_width_follows_retention():
    assert partition_width(0) == WEEK  # kept forever
    assert partition_width(1) == partition_width(30) == partition_width(92) == DAY
    assert partition_width(93) == partition_width(3650) == WEEK


def test_plan_from_nothing_daily_and_weekly():
    daily = plan_partitions([], NOW, DAY, WEEK)
    assert daily[0] == ("request_logs_p20270317", utc(2027, 3, 17), utc(2027, 3, 18))
    assert [p[1] for p in daily] == [utc(2027, 3, 17) + DAY * i for i in range(8)]
    assert daily[-1][2] >= NOW + WEEK
    weekly = plan_partitions([], NOW, WEEK, 2 * WEEK)
    assert [(p[1], p[2]) for p in weekly] == [
        (utc(2027, 3, 15), utc(2027, 3, 22)),  # from Monday
        (utc(2027, 3, 22), utc(2027, 3, 29)),
        (utc(2027, 3, 29), utc(2027, 4, 5)),
    ]


def test_plan_continues_from_the_newest_partition_and_switches_width():
    existing = [
        Partition("request_logs_default", None, None, default=True),
        Partition("request_logs_p20270308", utc(2027, 3, 8), utc(2027, 3, 15)),
        Partition("request_logs_p20270315", utc(2027, 3, 15), utc(2027, 3, 22)),
    ]
    assert plan_partitions(existing, NOW, WEEK, 2 * WEEK) == [
        ("request_logs_p20270322", utc(2027, 3, 22), utc(2027, 3, 29)),
        ("request_logs_p20270329", utc(2027, 3, 29), utc(2027, 4, 5)),
    ]
    # retention shortened to a month: days from where the weeks end
    daily = plan_partitions(existing, NOW, DAY, WEEK)
    assert daily[0][1] == utc(2027, 3, 22) and daily[0][2] == utc(2027, 3, 23)
    # the other way: a partial first week, up to Monday
    days = [Partition("request_logs_p20270317", utc(2027, 3, 17), utc(2027, 3, 18))]
    assert plan_partitions(days, NOW, WEEK, WEEK)[0][1:] == (utc(2027, 3, 18), utc(2027, 3, 22))


def test_plan_after_a_gap_starts_today_without_overlap():
    old = [Partition("request_logs_p20270101", utc(2027, 1, 1), utc(2027, 1, 2))]
    assert plan_partitions(old, NOW, DAY, WEEK)[0][1] == utc(2027, 3, 17)
    tuesday = [Partition("request_logs_p20270315", utc(2027, 3, 15), utc(2027, 3, 16))]
    assert plan_partitions(tuesday, NOW, WEEK, WEEK)[0][1:] == (utc(2027, 3, 16), utc(2027, 3, 22))
    assert plan_partitions(tuesday, utc(2027, 3, 15, 12), DAY, timedelta(0)) == []


# --- on PostgreSQL ------------------------------------------------------------------------


def insert_rows(url: str, ages_in_days: list[float]) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for age in ages_in_days:
            cur.execute(
                "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, "
                "path, status, latency_ms) VALUES (%s, now() - %s * interval '1 day', %s, "
                "'openai', 'POST', '/v1/chat/completions', 200, 1.0)",
                (str(uuid.uuid4()), age, str(uuid.uuid4())),
            )
    conn.close()


def rows(url: str, sql: str, args=None) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def remaining_ages(url: str) -> list[int]:
    return [
        r[0]
        for r in rows(
            url,
            "SELECT floor(extract(epoch FROM now() - created_at) / 86400)::int "
            "FROM request_logs ORDER BY created_at",
        )
    ]


def where_rows_are(url: str) -> dict[str, int]:
    return dict(rows(url, "SELECT tableoid::regclass::text, count(*) FROM request_logs GROUP BY 1"))


def job(database, days: int, metrics: Registry | None = None, **kw) -> RequestLogMaintenance:
    return RequestLogMaintenance(
        RequestLogStore(database),
        days=days,
        reactor=reactor,
        metrics=metrics or Registry(),
        pause=0,
        **kw,
    )


@pytest_twisted.ensureDeferred
async def test_partitions_are_made_ahead_and_expired_whole(database, db_url):
    metrics = Registry()
    store = RequestLogStore(database)
    # daily partitions for the last 45 days, up to the migration's weeks
    first_week = min(p.start for p in await store.partitions() if not p.default)
    start = first_week - timedelta(days=45)
    while start < first_week:
        assert await store.create_partition(f"request_logs_p{start:%Y%m%d}", start, start + DAY)
        start += DAY
    # a day that exists already: refused, not an error
    assert not await store.create_partition("request_logs_p19990101", first_week, first_week + DAY)
    insert_rows(db_url, [400, 90, 40, 31, 29.5, 1, 0])
    assert where_rows_are(db_url)["request_logs_default"] == 2  # before the first partition

    cutoff = datetime.now(UTC) - timedelta(days=30)
    expired = {p.name for p in await store.partitions() if not p.default and p.end <= cutoff}
    assert len(expired) >= 14

    maintenance = job(database, 30, metrics, batch=1, ahead=timedelta(days=40))
    result = await maintenance.run_once()
    assert not result.busy
    # the partitions that hold only expired rows are gone, whole; the
    # default partition's expired rows were deleted one batch at a time
    assert sorted(remaining_ages(db_url), reverse=True) == [29, 1, 0]
    assert result.deleted == 2
    assert metrics.get("lectr_usage_rows_expired_total").value() == 2
    left = await store.partitions()
    assert all(p.end > cutoff for p in left if not p.default)
    assert set(result.dropped) == expired
    assert metrics.get("lectr_request_log_partitions_dropped_total").value() == len(result.dropped)
    # made ahead: daily partitions from the end of the migration's weeks, 40 days on
    newest = max(p.end for p in left if not p.default)
    assert newest >= datetime.now(UTC) + timedelta(days=40)
    assert result.created and all(p.end - p.start == DAY for p in left if p.name in result.created)
    assert metrics.get("lectr_request_log_partitions").value() == len(left)
    assert metrics.get("lectr_request_log_default_rows").value() == 0
    # a second round has nothing to do
    again = await maintenance.run_once()
    assert (again.created, again.dropped, again.deleted) == ((), (), 0)


@pytest_twisted.ensureDeferred
async def test_rows_of_the_default_partition_move_into_a_new_partition(database, db_url):
    # a skewed clock: two rows 60 days ahead (the same instant: one partition,
    # whatever the time of day) and one 90 days ahead
    insert_rows(db_url, [-60, -60, -90])
    assert where_rows_are(db_url) == {"request_logs_default": 3}
    result = await job(database, 0, ahead=timedelta(days=70)).run_once()
    assert result.created
    placed = where_rows_are(db_url)
    assert placed.get("request_logs_default") == 1  # 90 days ahead: still nowhere else
    assert sum(placed.values()) == 3
    (moved,) = [name for name in placed if name != "request_logs_default"]
    assert moved in result.created
    # retention 0 keeps everything
    assert len(remaining_ages(db_url)) == 3


@pytest_twisted.ensureDeferred
async def test_one_node_at_a_time(database, db_url):
    insert_rows(db_url, [100, 50])
    other = psycopg2.connect(db_url)
    other.autocommit = False
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_RETENTION_LOCK,))  # another node
        result = await job(database, 30, ahead=timedelta(days=60)).run_once()
        assert result.busy and result.created == () and result.deleted == 0
        assert len(remaining_ages(db_url)) == 2
    finally:
        other.rollback()
        other.close()


@pytest_twisted.ensureDeferred
async def test_a_busy_table_makes_the_job_wait_for_the_next_round(database, db_url):
    """A long reader holds request_logs: the DDL gives up after its
    lock_timeout instead of queueing ahead of every insert."""
    reader = psycopg2.connect(db_url)
    reader.autocommit = False
    try:
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM request_logs")  # holds ACCESS SHARE
        result = await job(database, 0, ahead=timedelta(days=60)).run_once()
        assert result.busy and result.created == ()
    finally:
        reader.rollback()
        reader.close()
    result = await job(database, 0, ahead=timedelta(days=60)).run_once()
    assert not result.busy and result.created


@pytest_twisted.ensureDeferred
async def test_the_loop_survives_failures():
    clock = Clock()

    class Broken:
        calls = 0

        async def partitions(self):
            Broken.calls += 1
            raise RuntimeError("boom")

    m = RequestLogMaintenance(Broken(), days=30, reactor=clock, metrics=Registry(), interval=10)
    m.start()
    clock.advance(10)
    clock.advance(10)
    assert Broken.calls == 3
    m.stop()


def test_partition_names_are_checked():
    with pytest.raises(ValueError):
        RequestLogStore(None).drop_partition("request_logs_default").send(None)
    with pytest.raises(ValueError):
        RequestLogStore(None).drop_partition("organizations").send(None)
