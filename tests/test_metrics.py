"""The metrics registry: the exposition format, the multiprocess files of
``--workers N`` (merging, gauge modes, exited workers, stale runs)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from lectr.metrics import MetricsFileSync, MetricsRunDirectory, Registry


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_render_in_one_process():
    r = Registry()
    c = r.counter("lectr_things_total", "Things done", ["provider", "status"])
    c.inc(1, "openai", "200")
    c.inc(2, "openai", "200")
    c.inc(1, "anthropic", 'we"ird\n')
    r.counter("lectr_nothing_total", "Nothing yet")
    h = r.histogram("lectr_wait_seconds", "Waits", ["provider"], buckets=(0.1, 1.0))
    h.observe(0.05, "openai")
    h.observe(0.5, "openai")
    h.observe(7, "openai")
    r.callback_gauge("lectr_in_flight", "In flight", lambda: 3)
    text = r.render()
    assert "# TYPE lectr_things_total counter" in text
    assert "# HELP lectr_things_total Things done" in text
    s = samples(text)
    assert s['lectr_things_total{provider="openai",status="200"}'] == 3
    assert s['lectr_things_total{provider="anthropic",status="we\\"ird\\n"}'] == 1
    assert s["lectr_nothing_total"] == 0
    assert s['lectr_wait_seconds_bucket{le="0.1",provider="openai"}'] == 1
    assert s['lectr_wait_seconds_bucket{le="1.0",provider="openai"}'] == 2
    assert s['lectr_wait_seconds_bucket{le="+Inf",provider="openai"}'] == 3
    assert s['lectr_wait_seconds_count{provider="openai"}'] == 3
    assert s['lectr_wait_seconds_sum{provider="openai"}'] == pytest.approx(7.55)
    assert s["lectr_in_flight"] == 3
    # families come sorted by name
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == sorted(types)


def test_registration_rules():
    r = Registry()
    with pytest.raises(ValueError, match="_total"):
        r.counter("lectr_things", "no suffix")
    with pytest.raises(ValueError, match="mode"):
        r.gauge("lectr_g", "g", mode="sum")  # only live modes: exited workers stop counting
    c = r.counter("lectr_x_total", "x", ["a"])
    assert r.counter("lectr_x_total", "x", ["a"]) is c
    with pytest.raises(ValueError, match="already registered"):
        r.histogram("lectr_x_total", "x")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(1, "a", "b")


def worker(directory, pid: int) -> Registry:
    r = Registry()
    r.share(directory, pid)
    return r


def test_workers_add_up_by_kind_and_mode(tmp_path):
    a, b = worker(tmp_path, 101), worker(tmp_path, 102)
    for r, n, cached, writable in ((a, 3, 10, 1), (b, 4, 12, 0)):
        r.counter("lectr_req_total", "Requests", ["status"]).inc(n, "200")
        r.histogram("lectr_req_seconds", "Seconds", buckets=(1.0,)).observe(0.5)
        r.callback_gauge("lectr_active", "Active", lambda n=n: n)
        r.callback_gauge("lectr_cached", "Cached", lambda c=cached: c, mode="livemax")
        r.callback_gauge("lectr_writable", "Writable", lambda w=writable: w, mode="livemin")
        r.callback_gauge("lectr_each", "Each", lambda n=n: n, mode="liveall")
    b.sync()
    s = samples(a.render())  # the scraping worker writes its own values first
    assert s['lectr_req_total{status="200"}'] == 7
    assert s['lectr_req_seconds_bucket{le="1.0"}'] == 2
    assert s["lectr_req_seconds_count"] == 2
    assert s["lectr_req_seconds_sum"] == 1.0
    assert s["lectr_active"] == 7
    assert s["lectr_cached"] == 12
    assert s["lectr_writable"] == 0
    assert s['lectr_each{pid="101"}'] == 3 and s['lectr_each{pid="102"}'] == 4


def test_an_exited_worker_keeps_counting_but_its_gauges_go(tmp_path):
    run = MetricsRunDirectory.create(tmp_path)
    try:
        a, b = worker(run.path, 201), worker(run.path, 202)
        for r in (a, b):
            r.counter("lectr_req_total", "Requests").inc(5)
            r.callback_gauge("lectr_active", "Active", lambda: 1)
        b.sync()
        b.unshare()
        run.process_ended(202)
        s = samples(a.render())
        assert s["lectr_req_total"] == 10
        assert s["lectr_active"] == 1
    finally:
        run.remove()
    assert not run.path.exists()


def test_stale_runs_are_removed_live_ones_kept(tmp_path):
    first = MetricsRunDirectory.create(tmp_path)
    stale = tmp_path / "metrics" / "run-1-old"
    stale.mkdir()
    (stale / "lock").touch()
    (stale / "counter_1.db").write_bytes(b"x")
    no_lock = tmp_path / "metrics" / "run-2-older"
    no_lock.mkdir()
    second = MetricsRunDirectory.create(tmp_path)
    try:
        assert first.path.exists()  # its supervisor still holds the lock
        assert not stale.exists() and not no_lock.exists()
        assert second.path != first.path
    finally:
        first.remove()
        second.remove()


def test_a_failing_callback_does_not_stop_the_others(tmp_path):
    r = worker(tmp_path, 301)
    r.counter("lectr_a_total", "a").inc(2)

    def broken() -> float:
        raise RuntimeError("gone")

    r.callback_gauge("lectr_broken", "b", broken)
    r.callback_gauge("lectr_fine", "f", lambda: 4)
    s = samples(r.render())
    assert s["lectr_a_total"] == 2 and s["lectr_fine"] == 4
    assert "lectr_broken" not in s


def test_file_sync_ticks_survives_failures_and_writes_at_stop(tmp_path):
    clock = Clock()
    r = Registry()
    c = r.counter("lectr_a_total", "a")
    sync = MetricsFileSync(r, tmp_path, reactor=clock, interval=1.0)
    sync.start()
    reader = worker(tmp_path, "reader")  # another worker scraping
    assert samples(reader.render())["lectr_a_total"] == 0

    c.inc(3)
    assert samples(reader.render())["lectr_a_total"] == 0  # not written yet
    clock.advance(1.0)
    assert samples(reader.render())["lectr_a_total"] == 3

    real_sync = r.sync
    r.sync = lambda: (_ for _ in ()).throw(OSError("disk full"))
    clock.advance(1.0)  # logged, the loop goes on
    r.sync = real_sync
    c.inc(1)
    clock.advance(1.0)
    assert samples(reader.render())["lectr_a_total"] == 4
    c.inc(1)
    sync.stop()
    assert samples(reader.render())["lectr_a_total"] == 5
    assert r.shared_directory is None


_events = st.lists(
    st.tuples(
        st.integers(0, 2),  # which worker
        st.sampled_from(["openai", "anthropic", "x y", 'q"uote']),
        st.floats(0, 20, allow_nan=False),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(_events)
def test_merged_workers_equal_one_process(tmp_path_factory, events):
    """Whatever the split of the same events between workers, the merged
    /metrics reports what one process would."""
    directory = tmp_path_factory.mktemp("mp")
    single = Registry()
    workers = [worker(directory, 400 + i) for i in range(3)]
    for r in [single, *workers]:
        r.counter("lectr_e_total", "e", ["provider"])
        r.histogram("lectr_e_seconds", "e", ["provider"], buckets=(0.5, 5.0))
    for index, provider, value in events:
        for r in (single, workers[index]):
            r.get("lectr_e_total").inc(1, provider)
            r.get("lectr_e_seconds").observe(value, provider)
    for r in workers[1:]:
        r.sync()
    merged = samples(workers[0].render())
    expected = samples(single.render())
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert merged[name] == pytest.approx(value), name


def test_the_gauges_every_worker_holds_a_copy_of_are_not_added_up(tmp_path):
    """With --workers, a gauge each worker computes about the same thing
    (offline limits, the price table, cooling keys) reads as one worker's,
    not N times it: ``lectr_limits_offline == 1`` is the documented alert."""
    from twisted.internet.task import Clock

    from lectr.limits.manager import LimitsManager
    from lectr.policy.health import KeyHealth
    from lectr.pricing.manager import PricingManager

    workers = [worker(tmp_path, 301), worker(tmp_path, 302)]
    for r in workers:
        limits = LimitsManager(None, reactor=Clock(), metrics=r)
        limits.limiter.offline = True
        health = KeyHealth(Clock(), metrics=r)
        health.cool("key-1", "openai", 429, 30)
        PricingManager(reactor=Clock(), metrics=r)
    workers[1].sync()
    s = samples(workers[0].render())
    assert s["lectr_limits_offline"] == 1
    assert s["lectr_provider_keys_cooling"] == 1
    assert s["lectr_price_overrides"] == 0
