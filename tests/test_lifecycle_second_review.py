"""Process lifecycle, database layer, metrics and the spill journal: defects
found in the third review, each shown by a test that failed before its fix."""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from lectr.config import load_config
from lectr.db.database import Database
from lectr.db.notify import ChangeListener
from tests.support.fake_provider import OPENAI_KEY  # noqa: F401 (used by _start_stream)
from tests.support.logs import captured_events
from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key
from tests.test_lifecycle_review import TOKEN, _start_stream, wait_for


@pytest.fixture
def mute_dsn():
    """A PostgreSQL URL whose server accepts TCP connections and never
    answers (a black-holed or hung server): a connection attempt to it
    stays under way until its timeout."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    try:
        yield f"postgresql://root@127.0.0.1:{mute.getsockname()[1]}/none", mute
    finally:
        mute.close()


async def peer_closed(server: socket.socket, timeout: float = 2.0) -> bool:
    """Whether the one connection made to ``server`` was closed by the client."""
    server.settimeout(timeout)
    conn, _ = server.accept()
    conn.setblocking(False)
    try:
        waited = 0.0
        while waited < timeout:
            try:
                if conn.recv(4096) == b"":
                    return True
            except BlockingIOError:
                pass
            await deferLater(reactor, 0.02)
            waited += 0.02
        return False
    finally:
        conn.close()


@pytest.fixture
def logged():
    with captured_events() as events:
        yield events


# --- cancelling a connection attempt -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pool_start_cancelled_while_connecting_is_cancelled(mute_dsn):
    """txpostgres's canceller asks libpq to cancel, which fails on a
    connection still being opened ("asynchronous connection attempt
    underway"): cancelling the pool's start ended in that OperationalError,
    not CancelledError, and left the attempt (its socket) open."""
    dsn, server = mute_dsn
    db = Database(dsn, reactor=reactor, min_size=1, max_size=1, connect_timeout=30.0)
    d = ensureDeferred(db.start())
    await deferLater(reactor, 0.2)  # the attempt is under way
    d.cancel()
    outcome: list = []
    d.addBoth(outcome.append)
    assert await wait_for(lambda: outcome, timeout=2.0)
    assert outcome[0].check(CancelledError), outcome[0]
    assert db._size == 0
    assert await peer_closed(server), "the cancelled attempt's connection stayed open"
    await db.close()


@pytest_twisted.ensureDeferred
async def test_stopping_the_listener_while_it_reconnects_ends_the_attempt(mute_dsn, logged):
    """The listener reconnects (PostgreSQL unreachable, packets dropped) and
    Lectr stops: the cancel raised OperationalError out of the attempt, which
    was logged as an unhandled error, and the attempt itself ran on: had it
    succeeded, a LISTEN connection would have stayed open after the stop."""
    dsn, server = mute_dsn
    ln = ChangeListener(dsn, reactor=reactor, connect_timeout=30.0)
    ln._connection_lost()  # as when its connection died
    await deferLater(reactor, 0.2)  # the reconnect's attempt is under way
    reconnecting = ln._reconnecting
    assert reconnecting is not None
    ln.stopService()
    outcome: list = []
    reconnecting.addBoth(outcome.append)
    assert await wait_for(lambda: outcome, timeout=2.0)
    # the CancelledError trapped, nothing else (no error left unhandled)
    assert not isinstance(outcome[0], Failure), outcome[0]
    assert ln._conn is None and not ln.connected
    assert await peer_closed(server), "the cancelled attempt's connection stayed open"


@pytest_twisted.ensureDeferred
async def test_a_stop_while_connecting_at_start_up_is_not_a_start_up_failure(
    mute_dsn, tmp_path, logged
):
    """SIGTERM while Lectr's first connection to PostgreSQL is under way (a
    pod stopped while the database host drops packets): the start-up ended
    in "unexpected error during start-up: OperationalError: asynchronous
    connection attempt underway", a critical line and exit status 1, instead
    of a plain stop."""
    from lectr.service import LectrService

    environ = {
        "DATABASE_URL": mute_dsn[0],
        "ENCRYPTION_KEY": new_master_key(),
        "LECTR_PROXY_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_ADMIN_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_DATA_DIR": str(tmp_path),
        "LECTR_ADMIN_TOKEN": "test-admin-token-0123456789",
        "LECTR_DB_POOL_MIN": "1",
    }
    service = LectrService(
        replace(load_config({}, environ)), reactor=reactor, exit_on_failure=False, freeze_gc=False
    )
    outcome: list = []
    service.ready.addBoth(outcome.append)
    service.startService()
    await deferLater(reactor, 0.3)  # the first connection attempt is under way
    await service.stopService()
    assert await wait_for(lambda: outcome, timeout=2.0)
    assert outcome[0].check(CancelledError), outcome[0]
    critical = [e for e in logged if e.get("log_level") == LogLevel.critical]
    assert not critical, critical


# --- a second request to stop ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_signal_while_stopping_logs_no_traceback(tmp_path, db_url, workers):
    """An operator who sends SIGTERM again (or SIGHUP, then SIGTERM) while
    Lectr drains a stream: Twisted's handler called reactor.stop a second
    time, which raised ReactorNotRunning, logged as an unhandled error with a
    traceback by a single process and by the supervisor of --workers (the
    workers were guarded, the process twistd runs was not)."""
    fake = FakeProviderProcess(interval=0.3)
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_ADMIN_TOKEN=TOKEN,
            LECTR_WORKERS=workers,
            LECTR_SHUTDOWN_GRACE="20",
            LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
        ),
        cwd=tmp_path,
    )
    try:
        if workers == "1":
            proc.wait_ready()
        else:
            proc.wait_for_output("Lectr is ready (2 workers)")
        reader, first_bytes, outcome = _start_stream(proc)
        assert first_bytes.wait(20), proc.output
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert outcome.get("status") == 200, (outcome, proc.output)
        assert proc.wait_exit(60) in (0, -signal.SIGTERM), proc.output
        assert "Server Shut Down." in proc.output, proc.output
        assert "Traceback" not in proc.output and "Unhandled" not in proc.output, proc.output
    finally:
        proc.kill()
        fake.stop()


# --- the spill journal ---------------------------------------------------------------


def test_the_spill_journal_works_where_directories_cannot_be_synced(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a directory (EINVAL: some FUSE and
    network mounts, WSL's drvfs). Syncing the new segment's name is a
    power-loss nicety, but its failure failed the whole append: during a
    database outage every usage row was dropped (spill_error) and each try
    left an empty segment behind. The development secrets already shrugged
    it off (lectr.devmode)."""
    import errno
    import os
    import stat

    from lectr.usage.journal import SpillJournal
    from tests.test_usage_recorder import rec

    real_fsync = os.fsync

    def refuse_directories(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_directories)
    journal = SpillJournal(tmp_path, max_bytes=10**7)
    rows = [rec(), rec()]
    assert journal.append(rows).written == 2
    journal.close()
    segment = journal.claim()
    assert segment is not None
    replayed, bad = segment.read()
    segment.delete()
    assert bad == 0
    assert [r.request_id for r in replayed] == [r.request_id for r in rows]
    assert journal.claim() is None


def test_a_directory_sync_that_fails_otherwise_is_an_error(tmp_path, monkeypatch):
    """(only "cannot sync a directory here" is shrugged off: an I/O error
    is not)"""
    import errno
    import os

    from lectr.util.files import fsync_dir

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError) as e:
        fsync_dir(tmp_path)
    assert e.value.errno == errno.EIO


# --- the supervisor ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stop_while_the_supervisor_unwinds_a_failed_start_waits_for_the_workers(
    tmp_path, monkeypatch
):
    """One worker fails its start-up, and the supervisor stops the others;
    SIGTERM arrives meanwhile (a process manager gives up on it). The second
    stop returned at once, so twistd's shutdown went ahead and the supervisor
    exited while a worker was still stopping, with no one left to kill it
    after the grace, its metrics directory left behind. It must wait for the
    same stop."""
    from tests.test_lifecycle_review import fake_supervisor

    exits: list[int] = []
    monkeypatch.setattr(
        "lectr.service._exit_after_reactor", lambda reactor, code: exits.append(code)
    )
    script = (
        'if [ "$LECTR_WORKER_INDEX" = 1 ]; then sleep 0.3; exit 1; fi\n'
        "trap 'sleep 1; exit 0' TERM\n"
        "while :; do sleep 0.05; done\n"
    )
    supervisor = fake_supervisor(tmp_path, script, workers=2, name="slow-to-stop-worker")
    supervisor.startService()
    assert await wait_for(lambda: supervisor._stopping, timeout=10.0)  # unwinding
    first = supervisor._workers.get(0)
    assert first is not None and not first.ended.called
    await supervisor.stopService()  # twistd's, on SIGTERM
    assert first.ended.called, "the supervisor stopped while a worker was still running"
    assert not supervisor._metrics_dir.path.exists()
    assert await wait_for(lambda: exits == [1], timeout=5.0)


# --- the usage recorder --------------------------------------------------------------


def test_a_stop_during_the_recorders_start_is_not_swallowed(tmp_path, logged):
    """SIGTERM while the usage recorder looks for rows to replay (a thread
    call during start-up): its ``except Exception`` caught the CancelledError,
    logged it as "cannot read the spill journal", and the start went on: the
    flusher started, and LectrService's start-up carried on starting the
    limits, the proxy and the ports while the stop tore everything down."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from lectr.metrics import Registry
    from lectr.usage.recorder import UsageRecorder

    in_thread = Deferred()  # the journal look-up, still running
    recorder = UsageRecorder(
        None,
        reactor=Clock(),
        data_dir=tmp_path,
        metrics=Registry(),
        run_in_thread=lambda fn, *args: in_thread,
    )
    d = ensureDeferred(recorder.start())
    d.cancel()
    outcome: list = []
    d.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), outcome
    assert outcome[0].check(CancelledError), outcome[0]
    assert not recorder._loop.running and not recorder._running
    assert not [e for e in logged if e.get("log_failure") is not None]
