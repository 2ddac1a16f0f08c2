"""The limiter in memory (time from a task.Clock): windows and rollover,
header formats, the credit rule and its bound, the local share while
offline, which refusal wins, lease rounds planned and answered
(the answers written out by hand), amounts of USD."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from lectr.errors import BadRequest
from lectr.limits import NO_LIMITS, Admission, Refusal
from lectr.limits.limiter import BUDGET_EXCEEDED, RATE_LIMITED, Limiter
from lectr.limits.model import (
    Limits,
    clean_usd,
    day_window,
    minute_window,
    month_window,
    reset_text,
    to_micro,
    usd_text,
)
from lectr.storage.limits import Drawn, SlotsHeld

T0 = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()


def ts(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def limiter(**kw) -> tuple[Limiter, Clock, list]:
    clock = Clock()
    clock.advance(T0)
    kicks: list = []
    lim = Limiter(clock=clock, kick=lambda: kicks.append(clock.seconds()), **kw)
    return lim, clock, kicks


def answer(
    lim: Limiter, now: float, grant_all: bool = True, used_by_others: int = 0, sweep: bool = False
):
    """Play one lease round, PostgreSQL's part written out for the counters
    planned: grant what is asked while the cap allows."""
    draws, slots = lim.plan(now, sweep=sweep)
    results = []
    for p in draws:
        c = p.counter
        used_before = used_by_others + c.held
        grant = min(p.want, max(c.cap - used_before - p.debt, 0)) if grant_all else 0
        results.append(
            Drawn(
                c.scope_id,
                c.metric,
                datetime.fromtimestamp(c.start, UTC),
                used_before + p.debt + grant,
                c.reported + p.spent,
                grant,
            )
        )
    alerts = lim.apply_draws(draws, results, now)
    held = [SlotsHeld(p.slots.scope_id, max(p.in_use, min(p.want, p.slots.cap)), 0) for p in slots]
    lim.apply_slots(slots, held, now)
    return draws, slots, alerts


# --- windows and formats ----------------------------------------------------------------


def test_windows_are_utc_minutes_days_and_calendar_months():
    assert minute_window(ts(2026, 3, 1, 12, 0, 59)) == (
        ts(2026, 3, 1, 12, 0),
        ts(2026, 3, 1, 12, 1),
    )
    assert day_window(ts(2026, 3, 1, 23, 59, 59)) == (ts(2026, 3, 1), ts(2026, 3, 2))
    assert month_window(ts(2026, 2, 14)) == (ts(2026, 2, 1), ts(2026, 3, 1))
    assert month_window(ts(2028, 2, 29, 23)) == (ts(2028, 2, 1), ts(2028, 3, 1))  # leap year
    assert month_window(ts(2026, 12, 31, 23, 59, 59)) == (ts(2026, 12, 1), ts(2027, 1, 1))
    assert month_window(ts(2027, 1, 1)) == (ts(2027, 1, 1), ts(2027, 2, 1))


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, b"0ms"),
        (0.0004, b"1ms"),
        (0.25, b"250ms"),
        (1, b"1s"),
        (19.5, b"19.5s"),
        (60, b"1m0s"),
        (360, b"6m0s"),
        (3723.5, b"1h2m3.5s"),
        (86400, b"24h0m0s"),
    ],
)
def test_reset_durations_are_written_the_openai_way(seconds, text):
    assert reset_text(seconds) == text


def test_usd_amounts():
    assert to_micro(Decimal("0.0000001")) == 1  # rounded up: never counted short
    assert to_micro(Decimal("12.5")) == 12_500_000
    assert usd_text(12_500_000) == "12.50" and usd_text(1) == "0.000001"
    assert usd_text(Decimal("300")) == "300.00"
    assert clean_usd(12.5, "x") == Decimal("12.5") and clean_usd("0.000001", "x")
    for bad in (0, -1, "1.0000001", "1e3", float("inf"), float("nan"), True, [1], "", " "):
        with pytest.raises(BadRequest):
            clean_usd(bad, "usd_per_day")


@given(st.decimals(min_value=0, max_value=10**9, places=9, allow_nan=False))
def test_micro_dollars_round_up_and_never_lose_more_than_a_micro_dollar(amount):
    micro = to_micro(amount)
    assert isinstance(micro, int)
    assert Decimal(micro) / 10**6 >= amount > Decimal(micro - 1) / 10**6


# --- admission --------------------------------------------------------------------------


def test_no_limits_is_one_shared_admission_without_headers():
    lim, _, kicks = limiter()
    assert lim.admit("org", "key", reserve_usd=Decimal(1)) is NO_LIMITS
    lim.set_org("org", [("other-key", "other-key", Limits(rpm=5))])
    assert lim.admit("org", "key", reserve_usd=None) is NO_LIMITS
    assert list(NO_LIMITS.headers) == []
    NO_LIMITS.settle(tokens=5, cost_usd=None)
    assert kicks == []


def test_credit_runs_one_lease_ahead_then_refuses_until_the_lease_arrives():
    lim, clock, kicks = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=100))])  # lease 5
    results = [lim.admit("org", "key", reserve_usd=None) for _ in range(7)]
    assert [isinstance(r, Admission) for r in results] == [True] * 5 + [False] * 2
    busy = results[5]
    assert (busy.kind, busy.retry_after) == (RATE_LIMITED, 1)
    assert "no allowance on this node for a moment" in busy.message
    assert len(kicks) == 1  # one round asked for, not one per request
    draws, _, _ = answer(lim, clock.seconds())
    assert [(p.debt, p.want, p.spent) for p in draws] == [(5, 5, 5)]
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Admission)


def test_the_cap_is_reached_cluster_wide_then_no_more_credit():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=10))])  # lease 1
    admitted = 0
    for _ in range(30):
        if isinstance(lim.admit("org", "key", reserve_usd=None), Admission):
            admitted += 1
        answer(lim, clock.seconds(), used_by_others=4)  # another node used 4
    assert admitted == 6
    r = lim.admit("org", "key", reserve_usd=None)
    assert r.message == "requests per minute limit of the organization reached (10/min)"
    assert r.retry_after == 30


def test_the_tightest_scope_gives_the_headers_and_the_longest_wait_wins():
    lim, clock, _ = limiter()
    lim.set_org(
        "org",
        [
            ("org", None, Limits(rpm=1000, usd_per_month=Decimal("1"))),
            ("key", "key", Limits(rpm=10, tpm=500)),
        ],
    )
    a = lim.admit("org", "key", reserve_usd=Decimal("0.5"))
    assert dict(a.headers) == {
        b"x-ratelimit-limit-requests": b"10",
        b"x-ratelimit-remaining-requests": b"9",
        b"x-ratelimit-reset-requests": b"30s",
        b"x-ratelimit-limit-tokens": b"500",
        b"x-ratelimit-remaining-tokens": b"500",
        b"x-ratelimit-reset-tokens": b"30s",
    }
    a.settle(tokens=600, cost_usd=Decimal("1"))
    answer(lim, clock.seconds())
    # both the key's tpm (30 s) and the org's monthly budget (30 s: a new
    # year) refuse; then a day later only the month holds
    r = lim.admit("org", "key", reserve_usd=Decimal("0.1"))
    assert isinstance(r, Refusal) and r.retry_after == 30
    clock.advance(30)
    r = lim.admit("org", "key", reserve_usd=Decimal("0.1"))
    assert isinstance(r, Admission)  # January: a new month


@pytest.mark.parametrize("minute", ["rpm", "tpm", "max_concurrent"])
@pytest.mark.parametrize("budget", ["usd_per_day", "usd_per_month"])
def test_a_spent_budget_names_itself_over_a_minute_limit_of_the_same_scope(minute, budget):
    """A scope over a minute limit and over a budget at once: the refusal is
    the budget's, with its wait (a retry after the minute would be refused
    again), in either order of the checks."""
    lim, clock, _ = limiter()
    clock.advance(ts(2027, 1, 15, 12, 0, 20) - clock.seconds())
    lim.set_org("org", [("org", None, Limits(**{minute: 1, budget: Decimal("1")}))])
    first = lim.admit("org", "key", reserve_usd=Decimal("0.5"))
    assert isinstance(first, Admission)
    if minute == "max_concurrent":  # in flight (its slot taken); the budget spent elsewhere
        answer(lim, clock.seconds(), used_by_others=1_000_000)
    else:
        first.settle(tokens=5, cost_usd=Decimal("1"))
        answer(lim, clock.seconds())
    r = lim.admit("org", "key", reserve_usd=Decimal("0.1"))
    assert isinstance(r, Refusal)
    end = ts(2027, 1, 16) if budget == "usd_per_day" else ts(2027, 2, 1)
    assert (r.kind, r.limit) == (BUDGET_EXCEEDED, budget)
    assert r.retry_after == int(end - clock.seconds())
    assert dict(r.headers)[b"retry-after"] == b"%d" % r.retry_after


def test_settle_twice_counts_once_and_releases_slots():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(max_concurrent=2, tpm=100))])
    a = lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())  # 2 slots held (1 in use + a lease of 1)
    b = lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())
    r = lim.admit("org", "key", reserve_usd=None)
    assert r.message == "concurrent requests limit of the organization reached (2)"
    slots = lim.slots["org"]
    assert slots.in_use == 2
    a.settle(tokens=10, cost_usd=None)
    a.settle(tokens=10, cost_usd=None)
    assert slots.in_use == 1
    assert lim.counters[("org", "tokens", int(minute_window(clock.seconds())[0]))].spent == 10
    b.settle(tokens=None, cost_usd=None)
    assert slots.in_use == 0


def test_a_reservation_bigger_than_a_lease_passes_once_when_nothing_is_owed():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(usd_per_day=Decimal("10")))])  # lease $0.50
    big = lim.admit("org", "key", reserve_usd=Decimal("2"))
    assert isinstance(big, Admission)
    second = lim.admit("org", "key", reserve_usd=Decimal("2"))
    assert isinstance(second, Refusal) and second.retry_after == 1  # until the lease round
    answer(lim, clock.seconds())
    assert isinstance(lim.admit("org", "key", reserve_usd=Decimal("0.4")), Admission)
    # the budget itself: $10, of which 2.4 reserved and 7.6 spent elsewhere
    answer(lim, clock.seconds(), used_by_others=7_600_000)
    # (0.1 still held by this node: a reservation of 0.1 would pass)
    r = lim.admit("org", "key", reserve_usd=Decimal("0.2"))
    assert (r.kind, r.limit) == (BUDGET_EXCEEDED, "usd_per_day")
    assert r.message == "daily budget of the organization reached ($10.00 per UTC day)"


# --- offline ----------------------------------------------------------------------------


def test_offline_the_held_lease_then_the_share_of_the_nodes_last_seen():
    lim, clock, kicks = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=100))])
    lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds(), used_by_others=20)  # held 6, others 20
    lim.nodes = 3
    lim.set_offline(True)
    n = sum(isinstance(lim.admit("org", "key", reserve_usd=None), Admission) for _ in range(100))
    # 5 left of the lease, then a third of the 74 nobody held
    assert n == 5 + 25
    assert kicks == [clock.seconds()]  # no rounds asked for while offline
    # a new minute while offline: a third of the cap
    clock.advance(30)
    n = sum(isinstance(lim.admit("org", "key", reserve_usd=None), Admission) for _ in range(100))
    assert n == 34
    # back online: what was admitted meanwhile is reported before any credit
    lim.set_offline(False)
    assert lim.admit("org", "key", reserve_usd=None).retry_after == 1
    draws, _, _ = answer(lim, clock.seconds())
    # the minute that ended offline (30 more than reported) and this one
    assert sorted(p.spent for p in draws) == [30, 34]
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Admission)


def test_offline_fail_closed_refuses_after_the_held_lease():
    lim, clock, _ = limiter(fail_closed=True)
    lim.set_org("org", [("org", None, Limits(rpm=100))])
    lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())
    lim.set_offline(True)
    results = [lim.admit("org", "key", reserve_usd=None) for _ in range(8)]
    assert sum(isinstance(r, Admission) for r in results) == 5
    r = results[-1]
    assert (r.status, r.kind, r.retry_after) == (503, "limits_unavailable", 5)


# --- lease rounds -------------------------------------------------------------------------


def test_an_idle_counter_gives_its_lease_back_and_old_windows_are_forgotten():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=100))])
    lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())  # held 6
    clock.advance(1)
    draws, _, _ = answer(lim, clock.seconds())  # still recent: refreshed, nothing returned
    assert [(p.debt, p.want) for p in draws] == [(0, 0)]
    clock.advance(2)
    draws, _, _ = answer(lim, clock.seconds())
    assert [(p.debt, p.want, p.spent) for p in draws] == [(-5, 0, 0)]
    assert lim.plan(clock.seconds()) == ([], [])  # nothing more to do, not watched
    clock.advance(60)
    assert len(lim.counters) == 1  # the minute that is over
    lim.plan(clock.seconds(), sweep=True)
    assert lim.counters == {}  # the window is over and fully reported


def test_budget_thresholds_are_reported_once_each():
    lim, clock, _ = limiter()
    lim.set_org("org", [("key", "key", Limits(usd_per_day=Decimal("1")))])
    lim.admit("org", "key", reserve_usd=Decimal("0.5")).settle(tokens=1, cost_usd=Decimal("0.79"))
    assert answer(lim, clock.seconds())[2] == []
    lim.admit("org", "key", reserve_usd=Decimal("0.2")).settle(tokens=1, cost_usd=Decimal("0.3"))
    alerts = answer(lim, clock.seconds())[2]  # past both thresholds at once
    assert [(a.budget, a.threshold, a.key_id, a.spent, a.cap) for a in alerts] == [
        ("usd_per_day", 80, "key", 1_090_000, 1_000_000),
        ("usd_per_day", 100, "key", 1_090_000, 1_000_000),
    ]
    assert answer(lim, clock.seconds())[2] == []


def test_a_removed_limit_gives_its_allowance_back_and_stops_counting():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(rpm=100))])
    a = lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())
    lim.set_org("org", [])
    assert lim.admit("org", "key", reserve_usd=None) is NO_LIMITS
    a.settle(tokens=3, cost_usd=None)
    draws, _, _ = answer(lim, clock.seconds())
    assert [(p.debt, p.want) for p in draws] == [(-5, 0)]
    assert lim.plan(clock.seconds()) == ([], [])
    assert lim.counters == {}


# --- the inline path --------------------------------------------------------------------------

_ORG_CAPS = Limits(
    rpm=60, tpm=4_000, max_concurrent=40, usd_per_day=Decimal("0.5"), usd_per_month=Decimal("2")
)
_KEY_CAPS = Limits(rpm=40, tpm=3_000, max_concurrent=30, usd_per_day=Decimal("0.3"))
#: what an admin may change meanwhile: the first is the start
_CONFIGS = (
    [("org", None, _ORG_CAPS), ("key", "key", _KEY_CAPS)],
    [("org", None, _ORG_CAPS)],  # the key's limits removed
    [("org", None, Limits(rpm=90, max_concurrent=8)), ("key", "key", _KEY_CAPS)],  # org changed
    [("key", "key", Limits(rpm=40, tpm=1_000, usd_per_month=Decimal("0.2")))],  # org's removed
    [],  # no limits at all
)


_admit = st.tuples(
    st.just("admit"),
    st.sampled_from(["key", "key", "other"]),
    st.none() | st.integers(min_value=0, max_value=60_000),
)
_round = st.tuples(
    st.just("round"),
    st.booleans(),
    st.sampled_from([0, 0, 0, 3, 10]),  # used by the other nodes
    st.booleans(),
)
_ops = st.lists(
    st.one_of(
        _admit,
        _admit,
        _admit,
        st.tuples(
            st.just("settle"),
            st.integers(min_value=0, max_value=50),
            st.none() | st.integers(min_value=0, max_value=300),
            st.none() | st.integers(min_value=0, max_value=40_000),
        ),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=50)),
        st.tuples(
            st.just("round"), st.booleans(), st.integers(min_value=0, max_value=10), st.booleans()
        ),
        # (T0 is 30 s before a minute, a day, a month and a year end)
        st.tuples(st.just("advance"), st.sampled_from([0.2, 1.0, 2.5, 29.5, 30.0, 3600.0])),
        st.tuples(st.just("offline"), st.booleans()),
        st.tuples(st.just("config"), st.integers(min_value=0, max_value=len(_CONFIGS) - 1)),
    ),
    min_size=30,
    max_size=200,
)


def _state(lim: Limiter) -> dict:
    counters = {
        key: (c.held, c.spent, c.reserved, c.reported, c.open, c.exhausted, c.watched)
        for key, c in lim.counters.items()
    }
    slots = {key: (s.held, s.in_use, s.exhausted) for key, s in lim.slots.items()}
    return {"counters": counters, "slots": slots, "watch": sorted(id(c) for c in lim._watch)}


def _outcome(r) -> tuple:
    if isinstance(r, Refusal):
        return ("refused", r.status, r.kind, r.message, r.retry_after, tuple(r.headers))
    return ("admitted", tuple(r.headers))


@settings(max_examples=300, deadline=None)
@given(ops=_ops, fraction=st.sampled_from([0.1, 0.5, 1.0]))
def test_the_inline_path_decides_exactly_as_the_careful_one(ops, fraction):
    # The hot path decides most admissions inline (every counter well inside
    # its lease); it must admit, refuse, charge, kick and answer headers
    # exactly as the careful path would, over any sequence of requests,
    # settlements, lease rounds (granted in full, in part or not at all),
    # window rollovers, outages and limits changed or removed meanwhile.
    # Caps are small so that every limit is reached.
    both = []
    for inline in (True, False):
        clock = Clock()
        clock.advance(T0)
        kicks: list = []
        lim = Limiter(
            clock=clock,
            kick=lambda kicks=kicks, clock=clock: kicks.append(clock.seconds()),
            lease_fraction=fraction,
            inline=inline,
        )
        lim.set_org("org", _CONFIGS[0])
        both.append((lim, clock, kicks, []))
    for op in ops:
        seen = []
        for lim, clock, kicks, open_ in both:
            kind = op[0]
            if kind == "admit":
                r = lim.admit("org", op[1], reserve_usd=op[2])
                if isinstance(r, Admission):
                    open_.append(r)
                seen.append(_outcome(r))
            elif kind == "settle" and open_:
                a = open_.pop(op[1] % len(open_))
                a.settle(tokens=op[2], cost_usd=op[3])
            elif kind == "free" and open_:  # (the answer complete; settled later)
                open_[op[1] % len(open_)].free()
            elif kind == "advance":
                clock.advance(op[1])
            elif kind == "round" and not lim.offline:
                draws, slots, _ = answer(lim, clock.seconds(), op[1], op[2], sweep=op[3])
                seen.append(([(p.debt, p.want, p.spent) for p in draws], len(slots)))
            elif kind == "offline":
                lim.set_offline(op[1])
            elif kind == "config":
                lim.set_org("org", _CONFIGS[op[1]])
            seen.append((len(kicks), lim.kicked, len(open_)))
        assert seen[: len(seen) // 2] == seen[len(seen) // 2 :], op
        (a, *_), (b, *_) = both
        assert (
            _state(a)["counters"] == _state(b)["counters"]
            and _state(a)["slots"] == _state(b)["slots"]
        ), op
    for lim, _, _, open_ in both:  # every slot given back once, freed early or not
        for a in open_:
            a.settle(tokens=None, cost_usd=None)
        assert all(s.in_use == 0 for s in lim.slots.values())


def test_free_gives_the_slots_back_once_and_settle_does_not_again():
    lim, clock, _ = limiter()
    lim.set_org("org", [("org", None, Limits(max_concurrent=2))])
    a = lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())
    b = lim.admit("org", "key", reserve_usd=None)
    answer(lim, clock.seconds())
    slots = lim.slots["org"]
    assert slots.in_use == 2
    assert isinstance(lim.admit("org", "key", reserve_usd=None), Refusal)
    a.free()
    a.free()
    assert slots.in_use == 1
    c = lim.admit("org", "key", reserve_usd=None)  # a's slot, before a is settled
    assert isinstance(c, Admission) and slots.in_use == 2
    a.settle(tokens=None, cost_usd=None)
    assert slots.in_use == 2
    b.settle(tokens=None, cost_usd=None)
    b.free()  # (after settle: nothing)
    c.settle(tokens=None, cost_usd=None)
    assert slots.in_use == 0
