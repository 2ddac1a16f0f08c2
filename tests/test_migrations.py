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


def partitions(url: str) -> set[str]:
    """Tables that are partitions of another (made by the migrations and the
    partition job, not by the model)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT relname FROM pg_class WHERE relispartition AND relkind = 'r'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_migrations_produce_the_model(db_url):
    skip = partitions(db_url)
    assert "request_logs_default" in skip
    engine = migrate._engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_name": lambda name, kind, parent: (
                        not (kind == "table" and name in skip)
                    ),
                },
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


def _rows(url: str, sql: str, args=None) -> list[tuple]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def test_partitioning_keeps_every_row(empty_db_url):
    """0008 converts a request_logs with rows (and with a column and an
    index that another migration added before it) into a partitioned table,
    and back, without losing or changing a row."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate._alembic_config())
    before = script.get_revision("0008").down_revision
    migrate.upgrade_sync(empty_db_url, before)
    url = empty_db_url
    _rows(url, "ALTER TABLE request_logs ADD COLUMN note text DEFAULT 'n'")
    _rows(url, "CREATE INDEX request_logs_note_idx ON request_logs (note) WHERE note <> 'n'")
    _rows(
        url,
        "INSERT INTO request_logs (request_id, created_at, org_id, provider, model, method, "
        " path, status, latency_ms, streamed, prompt_tokens, usage_source, note) "
        "SELECT gen_random_uuid(), now() - (g % 400) * interval '1 day' - g * interval '1 s', "
        " gen_random_uuid(), 'openai', CASE WHEN g % 7 = 0 THEN NULL ELSE 'gpt' END, 'POST', "
        " '/v1/chat/completions', 200, g, g % 2 = 0, g, 'provider', "
        " CASE WHEN g % 3 = 0 THEN 'x' || g END "
        "FROM generate_series(1, 3000) g",
    )
    _rows(  # out of every partition's range: 11 years old, and a year ahead
        url,
        "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, path, "
        " status, latency_ms) SELECT gen_random_uuid(), now() + s * interval '1 day', "
        " gen_random_uuid(), 'openai', 'POST', '/v1/x', 200, 1 FROM unnest(ARRAY[-4020, 365]) s",
    )
    _rows(url, "DELETE FROM request_logs WHERE id % 10 = 5")  # gaps in the ids
    snapshot = "SELECT to_jsonb(r)::text FROM request_logs r ORDER BY id"
    rows_before = _rows(url, snapshot)
    assert len(rows_before) == 3002 - 300
    (max_id,) = _rows(url, "SELECT max(id) FROM request_logs")[0]

    migrate.upgrade_sync(url, "0008")
    assert _rows(url, snapshot) == rows_before
    assert _rows(url, "SELECT relkind FROM pg_class WHERE relname = 'request_logs'") == [("p",)]
    placed = dict(
        _rows(url, "SELECT tableoid::regclass::text, count(*) FROM request_logs GROUP BY 1")
    )
    assert placed.pop("request_logs_default") == 2
    assert len(placed) >= 57 and all(name.startswith("request_logs_p") for name in placed)
    indexes = dict(
        _rows(url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'request_logs'")
    )
    assert "WHERE (note <> 'n'::text)" in indexes["request_logs_note_idx"]
    assert indexes["request_logs_pkey"].endswith("(id, created_at)")
    assert indexes["request_logs_request_id_key"].endswith("(request_id, created_at)")
    # the identity goes on after the copied ids; replays stay idempotent
    (new_id, request_id, created_at) = _rows(
        url,
        "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, path, "
        " status, latency_ms) VALUES (gen_random_uuid(), now(), gen_random_uuid(), 'openai', "
        " 'POST', '/v1/x', 200, 1) RETURNING id, request_id, created_at",
    )[0]
    assert new_id > max_id
    again = _rows(
        url,
        "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, path, "
        " status, latency_ms) VALUES (%s, %s, gen_random_uuid(), 'openai', 'POST', '/v1/x', "
        " 200, 1) ON CONFLICT (request_id, created_at) DO NOTHING RETURNING id",
        (request_id, created_at),
    )
    assert again == []
    _rows(url, "DELETE FROM request_logs WHERE id = %s", (new_id,))

    migrate.downgrade_sync(url, before)
    assert _rows(url, snapshot) == rows_before
    assert _rows(url, "SELECT relkind FROM pg_class WHERE relname = 'request_logs'") == [("r",)]
    indexes = dict(
        _rows(url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'request_logs'")
    )
    assert indexes["request_logs_pkey"].endswith("(id)")
    assert indexes["request_logs_request_id_key"].endswith("(request_id)")
    assert "request_logs_note_idx" in indexes
    assert not _rows(url, "SELECT 1 FROM pg_class WHERE relname ~ '^request_logs_(p[0-9]|default)'")
