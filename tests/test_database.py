"""The database facade against a real PostgreSQL."""

from __future__ import annotations

from urllib.parse import quote

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater

from lectr.db.database import Database, DatabaseUnavailable, Transaction
from lectr.metrics import Registry
from tests.support.pg import admin_execute


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds)


@pytest_twisted.ensureDeferred
async def test_run_query_returns_rows(database):
    rows = await database.runQuery("t", "SELECT %s::int + 1, 'x'", (41,))
    assert rows == [(42, "x")]


@pytest_twisted.ensureDeferred
async def test_async_interaction_commits_after_awaiting_every_statement(database):
    async def txn(t: Transaction) -> int:
        await t.execute("CREATE TABLE t1 (v int)")
        await sleep(0.01)  # a real suspension between statements
        await t.execute("INSERT INTO t1 VALUES (1), (2)")
        row = await t.fetchone("SELECT sum(v) FROM t1")
        return row[0]

    assert await database.runInteraction("create_t1", txn) == 3
    assert await database.runQuery("t", "SELECT count(*) FROM t1") == [(2,)]


@pytest_twisted.ensureDeferred
async def test_exception_rolls_back(database):
    await database.runQuery("t", "CREATE TABLE t2 (v int)")

    async def txn(t: Transaction) -> None:
        await t.execute("INSERT INTO t2 VALUES (1)")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await database.runInteraction("failing", txn)
    assert await database.runQuery("t", "SELECT count(*) FROM t2") == [(0,)]
    # the connection is usable afterwards
    assert await database.runQuery("t", "SELECT 1") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_sql_error_surfaces_as_psycopg2_error_and_connection_survives(database):
    with pytest.raises(psycopg2.errors.UndefinedTable):
        await database.runQuery("t", "SELECT * FROM no_such_table")
    assert await database.runQuery("t", "SELECT 2") == [(2,)]


@pytest_twisted.ensureDeferred
async def test_sync_and_deferred_interactions(database):
    def sync_txn(t: Transaction) -> str:
        return "plain"

    def deferred_txn(t: Transaction) -> Deferred:
        return t._cursor.execute("SELECT 5").addCallback(lambda c: c.fetchall())

    assert await database.runInteraction("sync", sync_txn) == "plain"
    assert await database.runInteraction("deferred", deferred_txn) == [(5,)]


@pytest_twisted.ensureDeferred
async def test_pool_grows_to_max_and_queues(db_url):
    db = Database(db_url, reactor=reactor, min_size=1, max_size=3)
    await db.start()
    try:
        results = await gatherResults(
            [db.runQuery("sleep", "SELECT pg_sleep(0.2), pg_backend_pid()") for _ in range(9)]
        )
        pids = {r[0][1] for r in results}
        assert len(pids) == 3  # grew from 1 to max, never beyond
        assert db._size == 3
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_recovers_after_backends_are_terminated(db_url):
    db = Database(db_url, reactor=reactor, min_size=3, max_size=3)
    await db.start()
    try:
        before = {
            r[0][0]
            for r in await gatherResults(
                [db.runQuery("pid", "SELECT pg_backend_pid(), pg_sleep(0.05)") for _ in range(3)]
            )
        }
        assert len(before) == 3
        dbname = (await db.runQuery("t", "SELECT current_database()"))[0][0]
        # An administrator (or a server restart) kills every connection of the pool.
        admin = psycopg2.connect(db_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        admin.close()
        # The very next operations succeed, on new connections.
        after = await gatherResults(
            [db.runQuery("pid", "SELECT pg_backend_pid()") for _ in range(3)]
        )
        assert {r[0][0] for r in after}.isdisjoint(before)

        async def txn(t: Transaction) -> int:
            return (await t.fetchone("SELECT 7"))[0]

        assert await db.runInteraction("after_restart", txn) == 7
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_interaction_is_retried_when_the_connection_died_before_begin(db_url):
    """Kill the backend without giving the reactor a chance to notice: the
    BEGIN fails on a dead socket, and the interaction runs on a new one."""
    db = Database(db_url, reactor=reactor, min_size=1, max_size=1)
    await db.start()
    try:
        conn, _ = db._idle[0]
        pid = conn._connection.get_backend_pid()
        admin_execute(db_url, "SELECT pg_terminate_backend(%s)", (pid,))
        calls = []

        async def txn(t: Transaction) -> int:
            calls.append(1)
            return (await t.fetchone("SELECT pg_backend_pid()"))[0]

        new_pid = await db.runInteraction("retry", txn)
        assert new_pid != pid
        assert calls == [1]  # the interaction body ran exactly once
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_cancelled_interaction_rolls_back_and_raises_cancelled(database):
    await database.runQuery("t", "CREATE TABLE t3 (v int)")
    started = Deferred()

    async def txn(t: Transaction) -> None:
        await t.execute("INSERT INTO t3 VALUES (1)")
        started.callback(None)
        await t.execute("SELECT pg_sleep(0.2)")

    d = database.runInteraction("cancelled", txn)
    await started
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert await database.runQuery("t", "SELECT count(*) FROM t3") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_notify_is_sent_with_the_commit(database):
    listener = psycopg2.connect(database.dsn)
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN lectr_changes")

        async def txn(t: Transaction) -> None:
            t.notify("org", "abc")
            t.notify("org", "abc")  # de-duplicated
            t.notify("key", "k1")

        await database.runInteraction("notify", txn)

        async def failing(t: Transaction) -> None:
            t.notify("org", "never")
            raise ValueError("rolled back")

        with pytest.raises(ValueError):
            await database.runInteraction("notify_fail", failing)
        await sleep(0.05)
        listener.poll()
        payloads = [n.payload for n in listener.notifies]
        assert payloads == ["org:abc", "key:k1"]
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_database_unavailable_without_password():
    db = Database(
        "postgresql://lectr:s3cretpw@127.0.0.1:1/lectr", reactor=reactor, min_size=1, max_size=1
    )
    with pytest.raises(DatabaseUnavailable) as info:
        await db.start()
    assert "s3cretpw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_unix_socket_url_and_sslmode(db_url):
    rows = psycopg2.connect(db_url)
    try:
        with rows.cursor() as cur:
            cur.execute(
                "SELECT current_database(), current_user, "
                "split_part(current_setting('unix_socket_directories'), ',', 1), "
                "current_setting('port')"
            )
            dbname, user, socket_dir, port = cur.fetchone()
    finally:
        rows.close()
    url = f"postgresql://{user}@/{dbname}?host={socket_dir.strip()}&port={port}&sslmode=disable"
    db = Database(url, reactor=reactor, min_size=1, max_size=1)
    await db.start()
    try:
        rows = await db.runQuery(
            "t",
            "SELECT inet_server_addr() IS NULL, "
            "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
        )
        over_socket, ssl = rows[0]
        assert over_socket is True  # no server address: a Unix socket
        assert ssl is False
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_operations_are_measured_by_description(db_url):
    registry = Registry()
    db = Database(db_url, reactor=reactor, min_size=1, max_size=1, metrics=registry)
    await db.start()
    try:
        await db.runQuery("count_things", "SELECT 1")
        with pytest.raises(psycopg2.Error):
            await db.runQuery("broken_thing", "SELECT * FROM nope")
    finally:
        await db.close()
    text = registry.render()
    assert 'lectr_db_transaction_seconds_count{desc="count_things"} 1' in text
    assert 'lectr_db_errors_total{desc="broken_thing"} 1' in text


@pytest_twisted.ensureDeferred
async def test_close_waits_for_in_flight_work(db_url):
    db = Database(db_url, reactor=reactor, min_size=1, max_size=2)
    await db.start()
    d = db.runQuery("slow", "SELECT pg_sleep(0.2), 1")
    await sleep(0.02)
    await db.close()
    # the query was allowed to finish: closing did not cut its connection
    assert (await d)[0][1] == 1
    with pytest.raises(DatabaseUnavailable):
        await db.runQuery("late", "SELECT 1")


@pytest.mark.parametrize(
    ("options", "jit", "timeout"),
    [
        (None, "off", None),
        ("-c statement_timeout=4321", "off", "4321ms"),
        ("-c jit=on", "on", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_connections_run_without_jit_and_keep_the_dsns_own_options(
    db_url, options, jit, timeout
):
    """PostgreSQL's JIT compiled the per-org totals over a large request log
    (40-55 ms of compile time for a query that then runs in less): Lectr's
    connections turn it off, after the DSN's own options, which are kept
    (and may turn it on again)."""
    dsn = db_url if options is None else f"{db_url}?options={quote(options)}"
    db = Database(dsn, reactor=reactor, min_size=1, max_size=1)
    await db.start()
    try:
        [(shown_jit, shown_timeout)] = await db.runQuery(
            "show", "SELECT current_setting('jit'), current_setting('statement_timeout')"
        )
    finally:
        await db.close()
    assert shown_jit == jit
    if timeout is not None:
        assert shown_timeout == timeout


@pytest_twisted.ensureDeferred
async def test_revoking_a_revoked_key_again_announces_nothing(database):
    """Every key announcement makes every node's key cache forget the hashes
    it found unknown: a revoke that changes nothing (repeated, idempotent)
    must not announce, or an admin script revoking in a loop would keep the
    negative caches empty."""
    from lectr.managers.orgs import OrgManager
    from lectr.storage.api_keys import ApiKeyStore
    from lectr.storage.orgs import OrgStore

    orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
    org, issued = await orgs.create_org("Revoker")
    listener = psycopg2.connect(database.dsn)
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN lectr_changes")
        first = await orgs.revoke_key(org.id, issued.key.id)
        again = await orgs.revoke_key(org.id, issued.key.id)
        assert first.revoked_at is not None and again.revoked_at == first.revoked_at
        await sleep(0.05)
        listener.poll()
        payloads = [n.payload for n in listener.notifies]
        assert payloads == [f"key:{issued.key.id}"]
    finally:
        listener.close()
