"""The change listener against a real PostgreSQL."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from lectr.db.database import DatabaseUnavailable, Transaction
from lectr.db.notify import ChangeListener
from tests.support.pg import admin_execute


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, step)
        waited += step


@pytest_twisted.async_yield_fixture
async def listener(db_url):
    ln = ChangeListener(
        db_url,
        reactor=reactor,
        ping_interval=0.2,
        ping_timeout=1.0,
        min_backoff=0.05,
        max_backoff=0.2,
    )
    await ln.startService()
    yield ln
    ln.stopService()


async def notify(database, *payloads: tuple[str, str]) -> None:
    async def txn(t: Transaction) -> None:
        for kind, ident in payloads:
            t.notify(kind, ident)

    await database.runInteraction("test_notify", txn)


@pytest_twisted.ensureDeferred
async def test_dispatches_by_kind(database, listener):
    orgs, keys = [], []
    listener.subscribe("org", orgs.append)
    listener.subscribe("key", keys.append)
    await notify(database, ("org", "o1"), ("key", "k1"), ("other", "x"))
    await wait_for(lambda: orgs and keys)
    assert orgs == ["o1"]
    assert keys == ["k1"]


@pytest_twisted.ensureDeferred
async def test_a_failing_subscriber_does_not_stop_the_others(database, listener):
    seen = []

    def broken(ident: str) -> None:
        raise RuntimeError("subscriber bug")

    listener.subscribe("org", broken)
    listener.subscribe("org", seen.append)
    await notify(database, ("org", "o2"))
    await wait_for(lambda: seen)
    assert seen == ["o2"]


@pytest_twisted.ensureDeferred
async def test_reconnects_and_resets_after_losing_its_connection(database, listener, db_url):
    resets: list[bool] = []
    seen: list[str] = []
    listener.on_reset(lambda: resets.append(True))
    listener.subscribe("org", seen.append)
    admin_execute(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'lectr-listener' AND datname = current_database()",
    )
    await wait_for(lambda: resets, timeout=10)
    assert listener.connected
    # notifications flow again on the new connection
    await notify(database, ("org", "after"))
    await wait_for(lambda: seen)
    assert seen == ["after"]


@pytest_twisted.ensureDeferred
async def test_notification_sent_while_disconnected_is_covered_by_reset(database, listener, db_url):
    """What the reset is for: a change made while the listener is away is
    never delivered, so subscribers reload after the reconnect."""
    resets: list[bool] = []
    seen: list[str] = []
    listener.on_reset(lambda: resets.append(True))
    listener.subscribe("org", seen.append)
    real_connect = listener._connect
    attempts: list[int] = []

    async def refusing_connect() -> None:
        attempts.append(1)
        if len(attempts) < 3:  # the server is "down" for the first attempts
            raise DatabaseUnavailable("refused (test)")
        await real_connect()

    listener._connect = refusing_connect
    admin_execute(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'lectr-listener' AND datname = current_database()",
    )
    await wait_for(lambda: attempts)
    assert not listener.connected
    await notify(database, ("org", "missed"))
    await wait_for(lambda: resets, timeout=10)
    assert len(attempts) == 3  # backed off and retried
    assert listener.connected
    assert seen == []  # lost, as PostgreSQL promises; the reset covers it


@pytest_twisted.ensureDeferred
async def test_stop_does_not_reconnect(db_url):
    ln = ChangeListener(db_url, reactor=reactor, min_backoff=0.01)
    await ln.startService()
    ln.stopService()
    d = Deferred()
    reactor.callLater(0.1, d.callback, None)
    await d
    assert not ln.connected
    assert ln._reconnecting is None
