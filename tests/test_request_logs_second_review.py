"""Second review of the request log's live cursor (a PostgreSQL snapshot,
migration 0009) and of the partition job, against the real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from tests import test_request_logs
from tests.test_request_logs import ORG, T0, rec

store, manager = test_request_logs.store, test_request_logs.manager  # (the fixtures)

INSERT = (
    "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, path, "
    "status, latency_ms{extra}) VALUES (%s, %s, %s, 'openai', 'POST', '/v1/chat/completions', "
    "200, 1.0{values})"
)


def sql(db_url: str, statement: str, args=None) -> list[tuple]:
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


async def create_while_a_row_commits(store, db_url: str, name: str, start, end) -> bool:
    """The partition job's ``create_partition`` while another node's flush
    of a row of its range is in flight; the flush commits while the job is
    at work (within its lock_timeout)."""
    writer = psycopg2.connect(db_url)
    try:
        with writer.cursor() as cur:
            cur.execute(INSERT.format(extra="", values=""), (str(uuid.uuid4()), T0, ORG))
        creating = defer.ensureDeferred(store.create_partition(name, start, end))
        await deferLater(reactor, 0.5, lambda: None)
        writer.commit()
        return await creating
    finally:
        writer.close()


# --- the live cursor ----------------------------------------------------------------------


@pytest.mark.parametrize("page", [200, 2], ids=["pages", "chains of full pages"])
@pytest_twisted.ensureDeferred
async def test_rows_restored_from_another_cluster_are_not_new_to_every_poll(
    manager, store, db_url, page
):
    """pg_restore (the documented backup) writes each row's txid as dumped:
    the old cluster's transaction ids, far ahead of the new cluster's. Such
    a row was stored before the live view began; it must not come back in
    every poll (nor keep every page full, so that `requests --follow`
    pages through the restored log without end)."""
    [(xmax,)] = sql(db_url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    restored = [str(uuid.uuid4()) for _ in range(5)]
    for i, rid in enumerate(restored):
        sql(
            db_url,
            INSERT.format(extra=", txid", values=", %s"),
            (rid, T0 - timedelta(days=1), ORG, xmax + 10**9 + i),
        )
    cursor = (await manager.recent_requests(ORG, limit=page)).live_cursor
    given: list[str] = []
    for _ in range(6):  # a live view polling, each time from the last answer's cursor
        answer = await manager.recent_requests(ORG, after=cursor, limit=page)
        given += [e.request_id for e in answer.items]
        cursor = answer.live_cursor
    assert not set(restored) & set(given), given
    # and what is stored from now on still comes, once
    late = rec()
    await store.insert([late])
    answer = await manager.recent_requests(ORG, after=cursor, limit=page)
    assert [e.request_id for e in answer.items] == [late.request_id]
    again = await manager.recent_requests(ORG, after=answer.live_cursor, limit=page)
    assert again.items == []


# --- the partition job ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_partition_is_made_while_rows_of_its_range_keep_arriving(store, db_url):
    """Rows of a new partition's range are in the default partition (every
    node was down past the partitions made ahead: today's rows land there)
    and more keep arriving while the job moves them. A row committed
    between the move and the ATTACH made the ATTACH fail (a check
    violation: the round failed, again at every round while traffic went
    on), so the range never got its partition."""
    start = T0.replace(hour=0, minute=0)
    end = start + timedelta(days=1)
    name = f"request_logs_p{start:%Y%m%d}"
    sql(db_url, INSERT.format(extra="", values=""), (str(uuid.uuid4()), T0, ORG))
    assert await create_while_a_row_commits(store, db_url, name, start, end)
    placed = dict(
        sql(db_url, "SELECT tableoid::regclass::text, count(*) FROM request_logs GROUP BY 1")
    )
    assert placed == {name: 2}
    # the moved partition keeps the live view's column default and index
    sql(db_url, INSERT.format(extra="", values=""), (str(uuid.uuid4()), T0, ORG))
    assert sql(db_url, f"SELECT count(*) FROM {name} WHERE txid IS NULL") == [(0,)]
    assert sql(
        db_url,
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_index x ON x.indexrelid = c.oid "
        "WHERE i.inhparent = 'request_logs_live_idx'::regclass "
        "AND x.indrelid = %s::regclass",
        (name,),
    ) == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_partition_is_made_while_the_first_row_of_its_range_commits(store, db_url):
    """No row of the range is stored yet, but one is being inserted (into
    the default partition) as the job creates the partition: the job must
    not fail on it (a check violation), but move it."""
    start = T0.replace(hour=0, minute=0)
    end = start + timedelta(days=1)
    name = f"request_logs_p{start:%Y%m%d}"
    assert await create_while_a_row_commits(store, db_url, name, start, end)
    placed = dict(
        sql(db_url, "SELECT tableoid::regclass::text, count(*) FROM request_logs GROUP BY 1")
    )
    assert placed == {name: 1}
