"""Migrations on a real database: up, down, up; model parity; concurrency."""

from __future__ import annotations

import threading

import psycopg2
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lectr.db import migrate
from lectr.db.schema import TABLES_WITH_UPDATED_AT, metadata


def _tables(url: str) -> set[str]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_upgrade_downgrade_upgrade(empty_db_url):
    head = migrate.head_revision()
    before, after = migrate.upgrade_sync(empty_db_url)
    assert (before, after) == (None, head)
    assert set(metadata.tables) <= _tables(empty_db_url)
    migrate.downgrade_sync(empty_db_url, "base")
    assert _tables(empty_db_url) == {"alembic_version"}
    assert migrate.current_revision_sync(empty_db_url) is None
    migrate.upgrade_sync(empty_db_url)
    assert migrate.current_revision_sync(empty_db_url) == head
    # a second upgrade is a no-op
    assert migrate.upgrade_sync(empty_db_url) == (head, head)


def test_migrations_produce_the_model(db_url):
    engine = migrate._engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(ctx, metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_updated_at_triggers(db_url):
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT event_object_table FROM information_schema.triggers "
                "WHERE trigger_name LIKE '%%_set_updated_at'"
            )
            assert {r[0] for r in cur.fetchall()} == set(TABLES_WITH_UPDATED_AT)
            cur.execute(
                "INSERT INTO organizations (name, created_at, updated_at) "
                "VALUES ('a', now() - interval '1 day', now() - interval '1 day') RETURNING id"
            )
            org_id = cur.fetchone()[0]
            cur.execute("UPDATE organizations SET name = 'b' WHERE id = %s", (org_id,))
            cur.execute(
                "SELECT now() - updated_at < interval '1 minute', "
                "now() - created_at > interval '1 hour' FROM organizations WHERE id = %s",
                (org_id,),
            )
            assert cur.fetchone() == (True, True)
    finally:
        conn.close()


def test_concurrent_upgrades_both_succeed(empty_db_url):
    """Two replicas starting at the same moment: the advisory lock makes one
    migrate while the other waits and then finds nothing to do."""
    results: list = []
    errors: list = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(migrate.upgrade_sync(empty_db_url))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    head = migrate.head_revision()
    assert sorted(results, key=str) == sorted([(None, head), (head, head)], key=str)
