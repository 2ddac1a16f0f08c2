"""Limits when PostgreSQL goes away (the outage forwarder cuts every
connection): held leases first, then each node's local share, or refusals
with fail-closed; back online, the counters catch up. Also: a limit change
reaches another node through NOTIFY within a second, and a crashed node's
concurrency slots come back."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.db.database import Database
from lectr.db.notify import ChangeListener
from lectr.limits import NO_LIMITS, Admission, Refusal
from lectr.limits.limiter import LIMITS_UNAVAILABLE
from tests.support.limits import LimitsEnv, admitted, refused
from tests.support.tcp_forward import TcpForwarder


@pytest_twisted.async_yield_fixture
async def env(database, db_url):
    e = LimitsEnv(database, db_url)
    await e.setup()
    yield e
    await e.close()


@pytest_twisted.async_yield_fixture
async def outage(db_url):
    """A database pool that reaches PostgreSQL through the forwarder."""
    fwd = await TcpForwarder.in_front_of(db_url)
    db = Database(fwd.rewrite(db_url), reactor=reactor, min_size=1, max_size=3)
    await db.start()
    yield fwd, db
    await db.close()
    await fwd.stop()


def count(results) -> int:
    return sum(isinstance(r, Admission) for r in results)


@pytest_twisted.ensureDeferred
async def test_held_leases_then_the_local_share_then_catching_up(env, outage):
    fwd, db = outage
    m = await env.manager(db)
    await m.update(env.org_id, env.key_id, {"rpm": 100})
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()  # holds 6: the request on credit and a lease of 5
    assert m.limiter.nodes == 1

    fwd.go_down()
    env.clock.advance(0.5)  # the next round (the counter is due for news) fails
    await m.sync()
    assert m.offline
    # the held lease first (5 left), then the node's share of what was left
    # (alone: all of it): 100 in the minute, no more
    results = [m.admit(env.org_id, env.key_id, reserve_usd=None) for _ in range(150)]
    assert count(results) == 99
    r = results[-1]
    assert isinstance(r, Refusal) and r.limit == "rpm" and r.retry_after == 30
    # a new window while still offline: the node's share of the whole cap
    env.clock.advance(30)
    assert count(m.admit(env.org_id, env.key_id, reserve_usd=None) for _ in range(150)) == 100

    fwd.come_back()
    await m.sync()
    assert not m.offline
    await m.sync()
    spent = [row[2] for row in env.counter(env.key_id, "requests")]
    assert spent == [100, 100]  # every admission reached the cluster-wide counters


@pytest_twisted.ensureDeferred
async def test_the_local_share_is_divided_among_the_nodes_last_seen(env, outage):
    fwd, db = outage
    other = await env.manager()  # a second node (on the direct connection)
    m = await env.manager(db)
    await m.update(env.org_id, None, {"rpm": 100})
    await other._reloader.refresh(env.org_id)
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await env.sync()
    assert m.limiter.nodes == 2
    fwd.go_down()
    env.clock.advance(0.5)
    await env.sync()
    assert m.offline and not other.offline
    # held 6 (1 spent), then half of the 94 not allocated
    assert count(m.admit(env.org_id, env.key_id, reserve_usd=None) for _ in range(100)) == 5 + 47


@pytest_twisted.ensureDeferred
async def test_fail_closed_refuses_once_the_held_leases_are_spent(env, outage):
    fwd, db = outage
    m = await env.manager(db, fail_closed=True)
    await m.update(env.org_id, None, {"rpm": 100, "max_concurrent": 50})
    other_org, _ = await env.orgs.create_org("Unlimited")
    first = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()
    fwd.go_down()
    env.clock.advance(0.5)
    await m.sync()
    assert m.offline
    results = [m.admit(env.org_id, env.key_id, reserve_usd=None) for _ in range(10)]
    ok = [r for r in results if isinstance(r, Admission)]
    refusals = [r for r in results if isinstance(r, Refusal)]
    # 4 slots held (1 in flight + a lease of 3) and 6 requests of the minute:
    # 3 more requests, then refusals
    assert len(ok) == 3 and len(refusals) == 7
    r = refusals[0]
    assert (r.status, r.kind, r.retry_after, r.limit) == (
        503,
        LIMITS_UNAVAILABLE,
        5,
        "max_concurrent",
    )
    assert "cannot be checked" in r.message
    assert dict(r.headers)[b"retry-after"] == b"5"
    # orgs without limits are not affected
    assert m.admit(other_org.id, "k", reserve_usd=None) is NO_LIMITS
    fwd.come_back()
    await m.sync()
    for a in ok + [first]:
        a.settle(tokens=None, cost_usd=None)
    assert isinstance(m.admit(env.org_id, env.key_id, reserve_usd=None), Admission)


@pytest_twisted.ensureDeferred
async def test_a_limit_change_reaches_another_node_within_a_second(env, db_url):
    listener = ChangeListener(db_url, reactor=reactor, ping_interval=0.5)
    await listener.startService()
    try:
        writer = await env.manager()
        follower = await env.manager(listener=listener)
        assert follower.admit(env.org_id, env.key_id, reserve_usd=None) is NO_LIMITS
        started = time.monotonic()
        await writer.update(env.org_id, env.key_id, {"rpm": 1})
        while follower.admit(env.org_id, env.key_id, reserve_usd=None) is NO_LIMITS:
            assert time.monotonic() - started < 1.0, "not applied within a second"
            await deferLater(reactor, 0.005)
        # and its removal
        await writer.update(env.org_id, env.key_id, {"rpm": None})
        started = time.monotonic()
        while follower.admit(env.org_id, env.key_id, reserve_usd=None) is not NO_LIMITS:
            assert time.monotonic() - started < 1.0
            await deferLater(reactor, 0.005)
    finally:
        listener.stopService()


@pytest_twisted.ensureDeferred
async def test_a_crashed_nodes_slots_come_back_after_their_expiry(env):
    crashed = await env.manager(slot_ttl=1.0)
    survivor = await env.manager(slot_ttl=1.0)
    await crashed.update(env.org_id, None, {"max_concurrent": 2})
    await survivor._reloader.refresh(env.org_id)
    admitted(crashed.admit(env.org_id, env.key_id, reserve_usd=None))
    await crashed.sync()
    admitted(crashed.admit(env.org_id, env.key_id, reserve_usd=None))
    await crashed.sync()
    # the node dies with its two requests: nothing more from it
    env.crash(crashed)
    # a node that has not heard from the cluster yet runs one lease (1) ahead
    credit = admitted(survivor.admit(env.org_id, env.key_id, reserve_usd=None))
    await survivor.sync()
    refused(survivor.admit(env.org_id, env.key_id, reserve_usd=None))
    credit.settle(tokens=None, cost_usd=None)
    await survivor.sync()
    refused(survivor.admit(env.org_id, env.key_id, reserve_usd=None))
    await deferLater(reactor, 1.2)  # the crashed node's slots expire (database time)
    env.clock.advance(1.0)  # the survivor checks again
    await survivor.sync()
    admitted(survivor.admit(env.org_id, env.key_id, reserve_usd=None))
