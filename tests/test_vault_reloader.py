"""OrgCacheReloader (lectr/vault/reloader.py): reloads run one at a time,
requests made meanwhile are coalesced, failures back off and retry.
Driven with controllable Deferreds and a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from lectr.vault.reloader import OrgCacheReloader


class Loads:
    """Records each load and lets the test finish it."""

    def __init__(self) -> None:
        self.calls: list[object] = []  # list of org ids, or "all"
        self.pending: list[Deferred] = []

    async def load_orgs(self, org_ids: list[str]) -> None:
        self.calls.append(list(org_ids))
        d = Deferred()
        self.pending.append(d)
        await d

    async def load_all(self) -> None:
        self.calls.append("all")
        d = Deferred()
        self.pending.append(d)
        await d

    def finish(self, error: Exception | None = None) -> None:
        d = self.pending.pop(0)
        if error is None:
            d.callback(None)
        else:
            d.errback(error)

    @property
    def in_flight(self) -> int:
        return len(self.pending)


@pytest.fixture
def setup():
    clock = Clock()
    loads = Loads()
    reloader = OrgCacheReloader(
        "test",
        load_orgs=loads.load_orgs,
        load_all=loads.load_all,
        reactor=clock,
        min_retry=1.0,
        max_retry=4.0,
    )
    return clock, loads, reloader


def test_paused_until_started(setup):
    clock, loads, reloader = setup
    reloader.org_changed("a")
    reloader.org_changed("b")
    assert loads.calls == []
    reloader.start()
    assert loads.calls == [["a", "b"]]
    loads.finish()
    assert reloader.idle


def test_one_at_a_time_and_coalesced(setup):
    clock, loads, reloader = setup
    reloader.start()
    reloader.org_changed("a")
    assert loads.calls == [["a"]] and loads.in_flight == 1
    for org in ("c", "b", "c", "a"):
        reloader.org_changed(org)
    assert loads.in_flight == 1  # never two at once
    loads.finish()
    assert loads.calls == [["a"], ["a", "b", "c"]]  # after the first, in one go
    loads.finish()
    assert reloader.idle and loads.calls[-1] == ["a", "b", "c"]


def test_a_reset_reloads_everything_once(setup):
    clock, loads, reloader = setup
    reloader.start()
    reloader.org_changed("a")
    reloader.org_changed("b")
    reloader.reset()
    reloader.org_changed("c")
    loads.finish()
    assert loads.calls == [["a"], "all"]  # the full reload covers b and c
    loads.finish()
    assert reloader.idle


def test_refresh_waits_for_a_reload_that_started_after_it(setup):
    clock, loads, reloader = setup
    reloader.start()
    reloader.org_changed("a")  # in flight: started before the refresh
    done = reloader.refresh("a")
    loads.finish()
    assert not done.called  # that reload may have read the old row
    assert loads.calls == [["a"], ["a"]]
    loads.finish()
    assert done.called and done.result is None


def test_failures_back_off_and_retry(setup):
    clock, loads, reloader = setup
    reloader.start()
    waiter = reloader.refresh("a")
    loads.finish(RuntimeError("database down"))
    failures = []
    waiter.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    reloader.org_changed("b")  # queued behind the backoff
    assert loads.in_flight == 0
    clock.advance(0.99)
    assert loads.in_flight == 0
    clock.advance(0.01)
    assert loads.calls[-1] == ["a", "b"]  # nothing asked for was dropped
    loads.finish(RuntimeError("still down"))
    clock.advance(1.5)
    assert loads.in_flight == 0  # the delay doubled
    clock.advance(0.5)
    assert loads.in_flight == 1
    loads.finish(RuntimeError("still down"))
    clock.advance(4.0)  # capped at max_retry
    assert loads.in_flight == 1
    loads.finish()
    assert reloader.idle
    # a success resets the delay
    reloader.org_changed("c")
    loads.finish(RuntimeError("again"))
    clock.advance(1.0)
    assert loads.in_flight == 1


def test_stop_cancels_and_ignores_later_requests(setup):
    clock, loads, reloader = setup
    reloader.start()
    reloader.org_changed("a")
    waiter = reloader.refresh("b")
    reloader.stop()
    assert waiter.called  # released, not left hanging
    reloader.org_changed("c")
    reloader.reset()
    assert loads.calls == [["a"]]
    assert reloader.refresh("d").called
