"""``--workers N``, third review: failure paths of the supervisor's restarts,
and the metric files of workers that die again and again."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

import lectr.metrics as metrics_module
from lectr.config import load_config
from lectr.metrics import MetricsRunDirectory, Registry
from lectr.workers import READY_FD, WorkerSupervisor
from tests.support.logs import captured_events
from tests.support.process import LectrProcess, base_env, new_master_key
from tests.test_metrics import samples

SECRET = "sk-proj-supervisor-third-review-secret-0123456789"


# --- a supervisor on a fake reactor --------------------------------------------------------


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, sig) -> None:
        self.signals.append(sig)


class ProcessReactor(MemoryReactorClock):
    """A clock that "spawns" processes: records them, or raises what
    ``fail`` holds (once each)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []
        self.fail: list[BaseException] = []
        self._next_pid = 40000

    def spawnProcess(self, protocol, executable, args, env=None, path=None, **kw):
        if self.fail:
            raise self.fail.pop(0)
        self._next_pid += 1
        transport = _Transport(self._next_pid)
        protocol.makeConnection(transport)
        self.spawned.append((protocol, env))
        return transport


logged = captured_events


def text(events: list[dict]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


@pytest.fixture
def supervisor(tmp_path):
    reactor = ProcessReactor()
    config = load_config({}, {"LECTR_DATA_DIR": str(tmp_path / "data"), "LECTR_WORKERS": "2"})
    sockets = [socket.socket(), socket.socket()]
    sup = WorkerSupervisor(config, None, reactor=reactor)
    sup._sockets = sockets
    sup._metrics_dir = MetricsRunDirectory.create(config.data_dir)
    try:
        yield sup, reactor
    finally:
        sup._metrics_dir.remove()
        for s in sockets:
            s.close()


def serving_worker(sup, reactor, index: int):
    """Worker ``index`` started and ready, as after a start-up."""
    protocol = sup._spawn(index)
    protocol.childDataReceived(READY_FD, b"ready\n")
    return protocol


def dies(protocol, code: int = 1) -> None:
    protocol.processEnded(Failure(ProcessTerminated(exitCode=code)))


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    error=st.sampled_from([ValueError, TypeError, RuntimeError, KeyError, AttributeError]),
    failures=st.integers(min_value=1, max_value=4),
)
def test_a_restart_that_fails_with_any_error_is_retried_with_backoff(supervisor, error, failures):
    """Not only OSError: whatever the spawn raises, the worker is started
    again later (backing off), rather than the exception escaping the
    callLater and the supervisor serving on with one worker fewer, for good.
    The line names the error's class, never its message (the spawn is handed
    the environment, secrets included)."""
    sup, reactor = supervisor
    sup._restart_delay.clear()
    first = serving_worker(sup, reactor, 0)
    reactor.fail = [error(f"bad env DATABASE_URL=postgresql://u:{SECRET}@h/db")] * failures
    with logged() as events:
        dies(first)
        delay = 0.5
        for _ in range(failures):
            reactor.advance(delay)  # the restart: the spawn raises
            assert 0 not in sup._workers
            delay *= 2
        reactor.advance(delay - 0.001)
        assert 0 not in sup._workers  # (backing off, not at once)
        reactor.advance(0.001)
        assert 0 in sup._workers, text(events)
        sup._workers[0].childDataReceived(READY_FD, b"ready\n")
    out = text(events)
    assert out.count(f"cannot start worker 0 ({error.__name__}); retrying in") == failures
    assert "worker 0 is back" in out
    assert SECRET not in out
    dies(sup._workers[0])  # (leave no restart pending for the next example)
    for call in reactor.getDelayedCalls():
        call.cancel()
    sup._workers.clear()


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, CancelledError])
def test_interrupts_and_cancellation_are_not_swallowed_by_the_restart(supervisor, error):
    sup, reactor = supervisor
    dies(serving_worker(sup, reactor, 0))
    reactor.fail = [error()]
    with pytest.raises(error):
        reactor.advance(0.5)


def test_an_os_error_is_still_logged_with_its_reason(supervisor):
    sup, reactor = supervisor
    dies(serving_worker(sup, reactor, 1))
    reactor.fail = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]
    with logged() as events:
        reactor.advance(0.5)
        reactor.advance(1.0)
    assert "cannot start worker 1 (Resource temporarily unavailable); retrying in 1.0s" in text(
        events
    )
    assert 1 in sup._workers


def test_a_restarted_worker_that_fails_its_start_up_is_logged_as_such_and_restarted(supervisor):
    """The restarted worker's ``ready`` failure is consumed quietly; the line
    that tells the operator is worker_ended's, which says it never got to
    serve, and the worker keeps being restarted (backing off)."""
    sup, reactor = supervisor
    with logged() as events:
        dies(serving_worker(sup, reactor, 0))
        reactor.advance(0.5)
        restarted = sup._workers[0]
        dies(restarted, code=1)  # before it wrote "ready"
        assert 0 not in sup._workers
        reactor.advance(1.0)  # the delay doubled: a crash loop backs off
        assert 0 in sup._workers and sup._workers[0] is not restarted
    out = text(events)
    assert "worker 0 exited (status 1, signal None); restarting in 0.5s" in out
    assert "worker 0 exited during start-up (status 1, signal None); restarting in 1.0s" in out
    assert "Unhandled error" not in out


def test_a_worker_is_restarted_even_when_its_gauge_files_cannot_be_removed(supervisor, monkeypatch):
    """Removing an exited worker's gauge files can fail (a data directory
    gone read-only): the error used to escape processEnded before the
    restart was scheduled, so that worker was never started again."""
    sup, reactor = supervisor

    def refused(pid, path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(metrics_module, "mark_process_dead", refused)
    with logged() as events:
        dies(serving_worker(sup, reactor, 0))
        reactor.advance(0.5)
    assert 0 in sup._workers, text(events)
    out = text(events)
    assert "cannot remove the gauge files of worker 0 (Read-only file system)" in out
    assert "worker 0 exited (status 1, signal None); restarting in 0.5s" in out


# --- the metric files of workers restarted again and again --------------------------------------


class _Worker:
    """One worker process writing to the run directory, as lectr.worker
    does it (MetricsFileSync with the worker's slot)."""

    def __init__(self, run: MetricsRunDirectory, pid: int, index: int) -> None:
        # a new process: it made none of the files it finds
        metrics_module._OWN_FILES = set()
        metrics_module._CARRIED = {}
        self.pid = pid
        self.registry = Registry()
        self.registry.share(run.path, pid, slot=f"worker{index}")
        self.requests = self.registry.counter("lectr_req_total", "Requests", ["status"])
        self.seconds = self.registry.histogram("lectr_req_seconds", "Seconds", buckets=(1.0,))
        self.registry.callback_gauge("lectr_active", "Active", lambda: 1)
        self.registry.callback_gauge("lectr_each", "Each", lambda: 1, mode="liveall")
        self.requests.inc(0, "200")  # every series from the first write
        self.seconds.observe_each([])


scraped = samples


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),  # which worker
            st.integers(min_value=0, max_value=5),  # requests it serves
            st.booleans(),  # then dies (and is restarted)
            st.booleans(),  # a scrape before it syncs again
        ),
        min_size=1,
        max_size=30,
    )
)
def test_workers_dying_again_and_again_keep_counting_without_piling_up_files(
    steps, tmp_path_factory
):
    """Each restart used to leave the dead pid's counter and histogram
    files behind (two more files per death, every one read at each scrape).
    Now a restarted worker takes over its slot's files: the directory holds
    two of them per worker however often they die, the counters never go
    back (what dead workers counted stays counted, once), and only live
    workers' gauges are reported."""
    saved = (metrics_module._OWN_FILES, metrics_module._CARRIED)
    run = MetricsRunDirectory.create(tmp_path_factory.mktemp("data"))
    pids = iter(range(10_000, 20_000))
    try:
        workers = {i: _Worker(run, next(pids), i) for i in range(3)}
        served = 0
        last_total = 0.0
        for index, n, die, early_scrape in steps:
            w = workers[index]
            w.requests.inc(n, "200")
            for _ in range(n):
                w.seconds.observe(0.5)
            served += n
            if early_scrape:
                # another worker answers before this one wrote its values
                total = scraped(workers[(index + 1) % 3].registry.render())
                assert total['lectr_req_total{status="200"}'] >= last_total
            if die:
                w.registry.sync()  # its last write as it stops
                w.registry.unshare()
                run.process_ended(w.pid)
                workers[index] = _Worker(run, next(pids), index)
                workers[index].registry.sync()  # its first write, at start
            for other in workers.values():
                other.registry.sync()
            s = scraped(workers[0].registry.render())
            total = s['lectr_req_total{status="200"}']
            assert total == served
            assert total >= last_total
            last_total = total
            assert s["lectr_req_seconds_count"] == served
            assert s['lectr_req_seconds_bucket{le="1.0"}'] == served
            assert s["lectr_active"] == 3  # the live workers only
            assert {k for k in s if k.startswith("lectr_each")} == {
                f'lectr_each{{pid="{w.pid}"}}' for w in workers.values()
            }
            names = sorted(p.name for p in run.path.glob("*.db"))
            assert len([n for n in names if n.startswith(("counter_", "histogram_"))]) == 6, names
            assert len([n for n in names if n.startswith("gauge_")]) == 3 * 2, names
    finally:
        metrics_module._OWN_FILES, metrics_module._CARRIED = saved
        run.remove()


def test_a_new_worker_in_a_slot_does_not_count_its_predecessor_twice_when_it_shares_again(tmp_path):
    """The values taken over are added once: a worker that shares again (the
    same process) rewrites its files, it does not add them a second time."""
    saved = (metrics_module._OWN_FILES, metrics_module._CARRIED)
    run = MetricsRunDirectory.create(tmp_path)
    try:
        first = _Worker(run, 1, 0)
        first.requests.inc(10, "200")
        first.registry.sync()
        first.registry.unshare()
        run.process_ended(1)
        second = _Worker(run, 2, 0)
        second.requests.inc(1, "200")
        assert scraped(second.registry.render())['lectr_req_total{status="200"}'] == 11
        second.registry.unshare()
        second.registry.share(run.path, 2, slot="worker0")
        assert scraped(second.registry.render())['lectr_req_total{status="200"}'] == 11
    finally:
        metrics_module._OWN_FILES, metrics_module._CARRIED = saved
        run.remove()


# --- the same, with real processes --------------------------------------------------------------

_401 = 'lectr_proxy_requests_total{provider="openai",status="401"}'


def _workers_of(proc: LectrProcess) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout
    return [
        int(p)
        for p in out.split()
        if "lectr.worker" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")
    ]


def _scrape(proc: LectrProcess) -> dict[str, float]:
    with urllib.request.urlopen(proc.url("admin", "/metrics"), timeout=5) as r:
        return scraped(r.read().decode())


def _unauthenticated(proc: LectrProcess, n: int) -> None:
    for _ in range(n):
        req = urllib.request.Request(
            proc.url("proxy", "/v1/chat/completions"), data=b"{}", method="POST"
        )
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=5)


def _wait(predicate, what: str, proc: LectrProcess, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}:\n{proc.output}"
        time.sleep(0.2)
    return value


@pytest.mark.slow
def test_killed_workers_leave_no_files_behind_and_their_counts_stay(tmp_path, db_url):
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_WORKERS="2",
            LECTR_DB_POOL_MIN="1",
            LECTR_DB_POOL_MAX="2",
            LECTR_SHUTDOWN_GRACE="2",
        ),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        (run_dir,) = (tmp_path / ".lectr" / "metrics").glob("run-*")
        sent = 0
        for kill in range(3):
            _unauthenticated(proc, 10)
            sent += 10
            _wait(lambda n=sent: _scrape(proc).get(_401) == n, "not counted", proc)
            time.sleep(1.2)  # both workers wrote their files since
            victim = _workers_of(proc)[0]
            os.kill(victim, signal.SIGKILL)
            _wait(
                lambda k=kill: proc.output.count(" is back") == k + 1,
                "worker not restarted",
                proc,
            )
            _wait(lambda v=victim: v not in _workers_of(proc), "victim still listed", proc)
            # what the killed worker had written is still counted, once
            for _ in range(4):
                assert _scrape(proc)[_401] == sent, proc.output
            names = sorted(p.name for p in run_dir.glob("*.db"))
            counters = [n for n in names if n.startswith(("counter_", "histogram_"))]
            assert len(counters) == 4, names  # two per worker, however many died
            assert not [n for n in names if n.startswith("gauge_") and str(victim) in n], names
    finally:
        proc.stop_cleanly()
    assert not run_dir.exists()
