"""Migrations on a real database: up, down, up; model parity; concurrency."""

from __future__ import annotations

import threading

import psycopg2
import psycopg2.errors
import pytest
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


def test_0004_renames_duplicate_org_names_deterministically(empty_db_url):
    """Before 0004, names could repeat; the upgrade keeps the oldest of
    each group as it is, suffixes the others with the first free " (n)",
    and never fails."""
    migrate.upgrade_sync(empty_db_url, "0003")
    long = "L" * 200
    rows = [  # (name, age in minutes): older first within each group
        ("Acme", 50),
        ("acme", 40),
        ("ACME", 30),
        ("Acme (2)", 45),  # already holds the first suffix
        (long, 20),
        (long.lower(), 10),
        ("Solo", 5),
    ]
    conn = psycopg2.connect(empty_db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name, age in rows:
                cur.execute(
                    "INSERT INTO organizations (name, created_at) "
                    "VALUES (%s, now() - %s * interval '1 minute')",
                    (name, age),
                )
        migrate.upgrade_sync(empty_db_url)
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM organizations ORDER BY created_at")
            names = [r[0] for r in cur.fetchall()]
            assert names == [
                "Acme",
                "Acme (2)",
                "acme (3)",
                "ACME (4)",
                long,
                "l" * 196 + " (2)",
                "Solo",
            ]
            # from now on the database itself refuses a duplicate
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute("INSERT INTO organizations (name) VALUES ('SOLO')")
        migrate.downgrade_sync(empty_db_url, "0003")
        with conn.cursor() as cur:
            cur.execute("INSERT INTO organizations (name) VALUES ('SOLO')")  # allowed again
            cur.execute(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_name = 'user_identities' AND column_name = 'email_verified'"
            )
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
