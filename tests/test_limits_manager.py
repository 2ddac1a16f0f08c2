"""Limits on a real PostgreSQL: each cap refuses at the right request with
the right headers, windows roll over (time from a task.Clock), two managers
share one cap through leases, the caps follow changes, and budgets alert."""

from __future__ import annotations

import pytest
import pytest_twisted

from lectr.limits import Admission
from lectr.limits.limiter import BUDGET_EXCEEDED, RATE_LIMITED
from tests.support.limits import LimitsEnv, admitted, headers, refused, sql, usd


@pytest_twisted.async_yield_fixture
async def env(database, db_url):
    e = LimitsEnv(database, db_url)
    await e.setup()
    yield e
    await e.close()


async def admit_and_sync(env, m, n: int, **kw):
    out = []
    for _ in range(n):
        out.append(admitted(m.admit(env.org_id, env.key_id, reserve_usd=kw.get("reserve"))))
        await m.sync()
    return out


# --- requests per minute ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rpm_of_a_key_refuses_the_fourth_request_until_the_next_minute(env):
    m = await env.manager()
    await m.update(env.org_id, env.key_id, {"rpm": 3})
    first = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert headers(first) == {
        b"x-ratelimit-limit-requests": b"3",
        b"x-ratelimit-remaining-requests": b"2",
        b"x-ratelimit-reset-requests": b"30s",
    }
    first.settle(tokens=10, cost_usd=None)
    await m.sync()
    second, third = await admit_and_sync(env, m, 2)
    assert headers(third)[b"x-ratelimit-remaining-requests"] == b"0"
    env.clock.advance(10.5)  # 19.5 s left in the minute
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert (r.status, r.kind, r.limit, r.scope) == (429, RATE_LIMITED, "rpm", "key")
    assert r.message == "requests per minute limit of the key reached (3/min)"
    assert r.retry_after == 20
    h = headers(r)
    assert h[b"retry-after"] == b"20" and h[b"retry-after-ms"] == b"20000"
    assert h[b"x-ratelimit-remaining-requests"] == b"0"
    assert h[b"x-ratelimit-reset-requests"] == b"20s"  # whole seconds, rounded up
    # a refused request is not counted
    assert env.counter(env.key_id, "requests")[0][2] == 3
    # the next minute admits again
    await env.advance(19.5)
    again = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert headers(again)[b"x-ratelimit-remaining-requests"] == b"2"
    assert headers(again)[b"x-ratelimit-reset-requests"] == b"1m0s"
    await m.sync()
    rows = env.counter(env.key_id, "requests")
    assert [r[2] for r in rows] == [3, 1]
    assert rows[1][0].timestamp() - rows[0][0].timestamp() == 60


@pytest_twisted.ensureDeferred
async def test_an_org_cap_holds_across_its_keys_and_names_the_org(env):
    other_key = await env.new_key()
    m = await env.manager()
    await m.update(env.org_id, None, {"rpm": 3})
    await m.update(env.org_id, env.key_id, {"rpm": 10})
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()
    admitted(m.admit(env.org_id, other_key, reserve_usd=None))
    await m.sync()
    ok = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    # the tighter of the two limits is in the headers
    assert headers(ok)[b"x-ratelimit-limit-requests"] == b"3"
    assert headers(ok)[b"x-ratelimit-remaining-requests"] == b"0"
    await m.sync()
    for key in (env.key_id, other_key):
        r = refused(m.admit(env.org_id, key, reserve_usd=None))
        assert r.message == "requests per minute limit of the organization reached (3/min)"
        assert r.scope == "org"
    # the key's own counter only counted what the org admitted
    await m.sync()
    assert env.counter(env.key_id, "requests")[0][2] == 2
    assert env.counter(env.org_id, "requests")[0][2] == 3


@pytest_twisted.ensureDeferred
async def test_without_limits_the_shared_no_op_admission(env):
    from lectr.limits import NO_LIMITS

    m = await env.manager()
    assert m.admit(env.org_id, env.key_id, reserve_usd=None) is NO_LIMITS
    await m.update(env.org_id, None, {"max_concurrent": 5})
    other = await env.new_key()
    a = admitted(m.admit(env.org_id, other, reserve_usd=None))
    assert a is not NO_LIMITS and list(a.headers) == []  # no rpm/tpm: no headers
    a.settle(tokens=None, cost_usd=None)
    await m.update(env.org_id, None, {"max_concurrent": None})
    assert m.admit(env.org_id, env.key_id, reserve_usd=None) is NO_LIMITS
    assert (await m.get(env.org_id)).updated_at is None  # the row is gone


# --- tokens per minute ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tpm_charges_real_usage_at_the_end_and_refuses_the_next_request(env):
    m = await env.manager()
    await m.update(env.org_id, env.key_id, {"tpm": 100})
    a = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert headers(a)[b"x-ratelimit-remaining-tokens"] == b"100"
    b = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))  # both in flight
    a.settle(tokens=60, cost_usd=None)
    await m.sync()
    c = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert headers(c)[b"x-ratelimit-remaining-tokens"] == b"40"
    # the stream in flight finishes past the cap: charged in full, never cut
    b.settle(tokens=70, cost_usd=None)
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert (r.kind, r.limit) == (RATE_LIMITED, "tpm")
    assert r.message == "tokens per minute limit of the key reached (100/min)"
    assert r.retry_after == 30
    assert headers(r)[b"x-ratelimit-limit-tokens"] == b"100"
    assert headers(r)[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers(r)[b"x-ratelimit-reset-tokens"] == b"30s"
    c.settle(tokens=5, cost_usd=None)
    await m.sync()
    assert env.counter(env.key_id, "tokens")[0][2] == 135
    await env.advance(30)
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))


# --- concurrency ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_concurrent_refuses_while_the_slots_are_taken(env):
    m = await env.manager()
    await m.update(env.org_id, None, {"max_concurrent": 2})
    a = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert (r.status, r.kind, r.limit, r.retry_after) == (429, RATE_LIMITED, "max_concurrent", 1)
    assert r.message == "concurrent requests limit of the organization reached (2)"
    assert headers(r)[b"retry-after"] == b"1"
    a.settle(tokens=None, cost_usd=None)
    a.settle(tokens=None, cost_usd=None)  # a second settle changes nothing
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    await m.sync()
    refused(m.admit(env.org_id, env.key_id, reserve_usd=None))
    view = await m.get(env.org_id)
    assert view.usage["concurrent"] == 2


# --- dollar budgets -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_daily_budget_reserves_the_worst_case_and_settles_the_real_cost(env):
    m = await env.manager()
    await m.update(env.org_id, env.key_id, {"usd_per_day": "1.00"})
    a = admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))
    await m.sync()
    b = admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))
    assert (r.status, r.kind, r.limit) == (429, BUDGET_EXCEEDED, "usd_per_day")
    assert r.message == "daily budget of the key reached ($1.00 per UTC day)"
    assert r.retry_after == 30  # midnight UTC
    # a cheaper real cost frees the rest of the reservation
    a.settle(tokens=100, cost_usd=usd("0.10"))
    await m.sync()
    c = admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))
    b.settle(tokens=100, cost_usd=usd("0.25"))
    c.settle(tokens=100, cost_usd=usd("0.30"))
    await m.sync()
    view = await m.get(env.org_id, env.key_id)
    assert view.usage["usd_today"] == "0.65"
    assert env.counter(env.key_id, "usd_day")[0][2] == 650_000
    refused(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))
    # the next UTC day starts afresh
    await env.advance(30)
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.40")))


@pytest_twisted.ensureDeferred
async def test_monthly_budget_of_the_org_and_the_calendar_month(env):
    m = await env.manager()
    await m.update(env.org_id, None, {"usd_per_month": "2"})
    a = admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("1.50")))
    a.settle(tokens=1, cost_usd=usd("1.99"))
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.02")))
    assert (r.kind, r.limit) == (BUDGET_EXCEEDED, "usd_per_month")
    assert (
        r.message == "monthly budget of the organization reached ($2.00 per calendar month (UTC))"
    )
    assert r.retry_after == 30  # 1 April, 00:00 UTC
    await env.advance(30)
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.02"))).settle(
        tokens=1, cost_usd=usd("0.01")
    )
    # a month of 30 days: the window ends on 1 May
    await m.sync()
    await env.advance(29 * 86400 + 12 * 3600)
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("1.99"))).settle(
        tokens=1, cost_usd=usd("1.99")
    )
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.02")))
    assert r.retry_after == 12 * 3600


@pytest_twisted.ensureDeferred
async def test_unpriced_requests_pass_while_the_budget_has_room_and_charge_nothing(env):
    m = await env.manager()
    await m.update(env.org_id, None, {"usd_per_day": "0.50"})
    a = admitted(m.admit(env.org_id, env.key_id, reserve_usd=None))
    a.settle(tokens=500, cost_usd=None)
    await m.sync()
    assert m.limiter._m_unpriced.value() == 1
    assert env.counter(env.org_id, "usd_day")[0][2] == 0
    # a priced request spends the budget; then unpriced ones are refused too
    admitted(m.admit(env.org_id, env.key_id, reserve_usd=usd("0.50"))).settle(
        tokens=10, cost_usd=usd("0.50")
    )
    await m.sync()
    r = refused(m.admit(env.org_id, env.key_id, reserve_usd=None))
    assert r.limit == "usd_per_day"


# --- leases across managers -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_managers_share_one_cap_through_leases(env):
    a = await env.manager()
    b = await env.manager()
    await a.update(env.org_id, env.key_id, {"rpm": 40})
    await b._reloader.refresh(env.org_id)  # (no listener in this test)
    admitted_count = 0
    for i in range(200):
        m = a if i % 2 else b
        if isinstance(m.admit(env.org_id, env.key_id, reserve_usd=None), Admission):
            admitted_count += 1
        if i % 7 == 0:
            await env.sync()
    await env.sync()
    # the credit bound: at most one lease (2) per node beyond the cap
    assert 40 <= admitted_count <= 40 + 2 * 2
    used, spent = env.counter(env.key_id, "requests")[0][1:]
    assert spent == admitted_count and used >= spent


@pytest_twisted.ensureDeferred
async def test_an_idle_node_gives_its_lease_back(env):
    a = await env.manager()
    b = await env.manager()
    await a.update(env.org_id, env.key_id, {"rpm": 100})
    await b._reloader.refresh(env.org_id)
    admitted(a.admit(env.org_id, env.key_id, reserve_usd=None))
    await a.sync()
    used, spent = env.counter(env.key_id, "requests")[0][1:]
    assert (used, spent) == (6, 1)  # one request on credit, then a lease of 5
    await env.advance(3)  # a is idle: its lease goes back
    assert env.counter(env.key_id, "requests")[0][1:] == (1, 1)
    # b can take everything that is left
    n = 0
    while isinstance(b.admit(env.org_id, env.key_id, reserve_usd=None), Admission):
        n += 1
        await b.sync()
        assert n <= 200
    assert n == 99


@pytest.mark.parametrize("fraction,lease", [(0.05, 1), (0.5, 2)])
@pytest_twisted.ensureDeferred
async def test_concurrency_across_two_managers(env, fraction, lease):
    a = await env.manager(lease_fraction=fraction)
    b = await env.manager(lease_fraction=fraction)
    await a.update(env.org_id, None, {"max_concurrent": 4})
    await b._reloader.refresh(env.org_id)
    held = []
    for i in range(12):
        m = a if i % 2 else b
        r = m.admit(env.org_id, env.key_id, reserve_usd=None)
        if isinstance(r, Admission):
            held.append(r)
        await env.sync()
    assert 4 <= len(held) <= 4 + 2 * lease
    for h in held:
        h.settle(tokens=None, cost_usd=None)
    await env.sync()
    await env.advance(3)
    # both gave their slots back
    rows = sql(env.db_url, "SELECT sum(held), sum(in_use) FROM limit_slots")
    assert rows == [(0, 0)]
