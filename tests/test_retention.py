"""Request-log retention on a real database."""

from __future__ import annotations

import uuid

import psycopg2
import pytest_twisted
from twisted.internet import reactor

from lectr.metrics import Registry
from lectr.storage.request_logs import _RETENTION_LOCK, RequestLogStore
from lectr.usage.retention import RequestLogRetention


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


def remaining_ages(url: str) -> list[int]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT floor(extract(epoch FROM now() - created_at) / 86400)::int "
            "FROM request_logs ORDER BY created_at"
        )
        ages = [r[0] for r in cur.fetchall()]
    conn.close()
    return ages


@pytest_twisted.ensureDeferred
async def test_deletes_rows_past_retention_in_batches(database, db_url):
    insert_rows(db_url, [400, 90, 40, 31, 29.5, 1, 0])
    metrics = Registry()
    job = RequestLogRetention(
        RequestLogStore(database), days=30, reactor=reactor, metrics=metrics, batch=2, pause=0
    )
    assert await job.run_once() == 4
    assert sorted(remaining_ages(db_url), reverse=True) == [29, 1, 0]
    assert metrics.get("lectr_usage_rows_expired_total").value() == 4
    assert await job.run_once() == 0


@pytest_twisted.ensureDeferred
async def test_one_node_at_a_time(database, db_url):
    insert_rows(db_url, [100, 50])
    other = psycopg2.connect(db_url)
    other.autocommit = False
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_RETENTION_LOCK,))  # another node
        job = RequestLogRetention(
            RequestLogStore(database), days=30, reactor=reactor, metrics=Registry()
        )
        assert await job.run_once() == 0
        assert len(remaining_ages(db_url)) == 2
    finally:
        other.rollback()
        other.close()
