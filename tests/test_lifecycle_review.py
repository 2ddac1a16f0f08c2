"""Process lifecycle and database layer: defects found in review, each
shown by a test that failed before its fix."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from lectr.config import Config
from lectr.db.database import Database, DatabaseUnavailable, Transaction
from lectr.db.notify import ChangeListener
from tests.support.fake_provider import OPENAI_KEY
from tests.support.pg import admin_execute
from tests.support.process import FakeProviderProcess, LectrProcess, base_env, new_master_key

TOKEN = "lifecycle-review-admin-token-0123456789"


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.02) -> bool:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            return False
        await deferLater(reactor, step)
        waited += step
    return True


def terminate_backends(db_url: str, application_name: str) -> int:
    rows = admin_execute(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND datname = current_database()",
        (application_name,),
    )
    return len(rows)


# --- the change listener -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listener_reconnects_when_its_connection_dies_under_a_ping(db_url, database):
    """The backend is terminated while the listener's ping is in flight (a
    PostgreSQL restart can do that): the ping fails on a connection psycopg2
    has already marked closed, so nothing reported it lost, and the listener
    stayed "connected" to a dead connection for ever: no reconnect, no cache
    reset, every later change missed (a revoked key still accepted)."""
    ln = ChangeListener(
        db_url,
        reactor=reactor,
        ping_interval=0.3,
        ping_timeout=30.0,  # the timeout must not be what rescues it
        min_backoff=0.05,
        max_backoff=0.2,
    )
    await ln.startService()
    try:
        resets: list[bool] = []
        seen: list[str] = []
        ln.on_reset(lambda: resets.append(True))
        ln.subscribe("key", seen.append)
        conn = ln._conn
        await conn.runOperation("SET application_name = 'lectr-listener-review'")
        real_run_query = conn.runQuery
        # the ping's round trip, slowed down so that the backend dies during it
        conn.runQuery = lambda sql: real_run_query("SELECT 1 FROM pg_sleep(5)")
        await deferLater(reactor, 0.6)  # a ping is in flight
        assert terminate_backends(db_url, "lectr-listener-review") == 1
        assert await wait_for(lambda: resets, timeout=5.0), "the listener never reconnected"
        assert ln.connected and ln._conn is not conn

        async def revoke(t: Transaction) -> None:
            t.notify("key", "revoked-key")

        await database.runInteraction("review_notify", revoke)
        assert await wait_for(lambda: seen, timeout=5.0)
        assert seen == ["revoked-key"]
    finally:
        ln.stopService()


# --- the pool ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pool_waiter_is_not_stranded_when_a_connection_attempt_fails():
    """PostgreSQL does not answer: the first operation opens the only
    connection slot and fails after the connect timeout; an operation queued
    behind it for that slot used to wait for ever (until some other operation
    succeeded), instead of failing with DatabaseUnavailable."""
    mute = socket.socket()  # accepts TCP connections and never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    port = mute.getsockname()[1]
    db = Database(
        f"postgresql://root@127.0.0.1:{port}/none",
        reactor=reactor,
        min_size=1,
        max_size=1,
        connect_timeout=0.3,
    )
    outcomes: dict[str, object] = {}
    try:
        for name in ("first", "queued"):
            d = db.runQuery(name, "SELECT 1")
            d.addBoth(lambda r, name=name: outcomes.__setitem__(name, r))
        assert await wait_for(lambda: len(outcomes) == 2, timeout=5.0), outcomes
        for name in ("first", "queued"):
            assert outcomes[name].check(DatabaseUnavailable), outcomes[name]
    finally:
        await db.close()
        mute.close()


# --- --workers -----------------------------------------------------------------------


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = []
    for child in (int(p) for p in out.split()):
        try:
            with open(f"/proc/{child}/cmdline") as f:
                if "lectr.worker" in f.read().replace("\0", " "):
                    found.append(child)
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_stop_when_the_supervisor_is_killed(tmp_path, db_url):
    """SIGKILL to the supervisor (an OOM kill, a process manager's last
    resort): its workers used to run on as orphans, still serving the port,
    so a restarted Lectr found it taken and a rolling upgrade ran old code.
    Now each worker notices and shuts down gracefully."""
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_WORKERS="2",
            LECTR_SHUTDOWN_GRACE="2",
        ),
        cwd=tmp_path,
    )
    workers: list[int] = []
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        workers = _workers_of(proc.proc.pid)
        assert len(workers) == 2, proc.output
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"orphaned workers still running: {survivors}\n{proc.output}"
        time.sleep(0.5)  # let the pumps read the workers' last lines
        assert proc.output.count("the supervisor is gone; shutting down") == 2, proc.output
        assert "Traceback" not in proc.output, proc.output
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()


def fake_supervisor(tmp_path, script: str, workers: int = 1, name: str = "fake-worker"):
    """A WorkerSupervisor over a shell script standing in for a worker
    (``ready`` written to fd 5 as a worker does), on free loopback ports."""
    from lectr.workers import WorkerSupervisor

    fake = tmp_path / name
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    config = Config(
        proxy_listen="tcp:0:interface=127.0.0.1",
        admin_listen="tcp:0:interface=127.0.0.1",
        data_dir=tmp_path / "data",
        workers=workers,
        shutdown_grace=1.0,
    )
    return WorkerSupervisor(config, None, reactor=reactor, executable=str(fake))


@pytest_twisted.ensureDeferred
async def test_a_worker_that_dies_soon_after_start_backs_off(tmp_path):
    """A worker that comes up, then dies within moments, again and again (a
    crash loop): its restart delay was reset to 0.5 s each time it reported
    ready, so it was restarted every half second for ever, reloading every
    cache from PostgreSQL each time, instead of backing off to 30 s."""
    delays: list[float] = []

    def observe(event: dict) -> None:
        if str(event.get("log_format", "")).startswith("worker {index} exited"):
            delays.append(event["delay"])

    globalLogPublisher.addObserver(observe)
    supervisor = fake_supervisor(
        tmp_path, "printf 'ready\\n' >&5\nsleep 0.1\nexit 3\n", name="crashing-worker"
    )
    try:
        supervisor.startService()
        await supervisor.ready
        assert await wait_for(lambda: len(delays) >= 4, timeout=20.0), delays
        assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    finally:
        globalLogPublisher.removeObserver(observe)
        await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_a_worker_that_dies_while_the_others_start_is_restarted(tmp_path):
    """Worker 0 is up and dies while worker 1 is still starting (it waits for
    the migration lock, say): the supervisor ignored the death because it was
    not "ready" yet, then announced "ready (2 workers)" with one worker, and
    never restarted the other."""
    mark = tmp_path / "started-once"
    script = (
        f'if [ "$LECTR_WORKER_INDEX" = 0 ] && [ ! -e {mark} ]; then\n'
        f"  touch {mark}; printf 'ready\\n' >&5; sleep 0.2; exit 3\n"
        "fi\n"
        '[ "$LECTR_WORKER_INDEX" = 1 ] && sleep 1.5\n'
        "printf 'ready\\n' >&5\n"
        "exec sleep 60\n"
    )
    back: list[int] = []

    def observe(event: dict) -> None:
        if event.get("log_format") == "worker {index} is back":
            back.append(event["index"])

    globalLogPublisher.addObserver(observe)
    supervisor = fake_supervisor(tmp_path, script, workers=2)
    try:
        supervisor.startService()
        await supervisor.ready
        assert await wait_for(lambda: back, timeout=10.0), "worker 0 was never restarted"
        assert back == [0]
        assert sorted(supervisor._workers) == [0, 1]
    finally:
        globalLogPublisher.removeObserver(observe)
        await supervisor.stopService()


@pytest_twisted.ensureDeferred
async def test_a_worker_that_cannot_be_spawned_is_retried(tmp_path):
    """Restarting a worker can fail in the supervisor itself (fork or exec
    refused: out of memory, the process limit). The exception escaped the
    timed call, was logged once, and the worker was never restarted: one
    worker fewer until the next restart of Lectr."""
    events: list[str] = []

    def observe(event: dict) -> None:
        fmt = str(event.get("log_format", ""))
        if fmt.startswith(("worker {index}", "cannot start worker")):
            events.append(fmt)

    globalLogPublisher.addObserver(observe)
    supervisor = fake_supervisor(tmp_path, "printf 'ready\\n' >&5\nexec sleep 60\n", name="worker")
    executable = supervisor._executable
    try:
        supervisor.startService()
        await supervisor.ready
        supervisor._executable = str(tmp_path / "missing")  # spawning fails now
        os.kill(supervisor._workers[0].pid, signal.SIGKILL)
        assert await wait_for(lambda: any("cannot start" in e for e in events), timeout=5.0), events
        supervisor._executable = executable  # and works again
        assert await wait_for(lambda: "worker {index} is back" in events, timeout=10.0), events
        assert sorted(supervisor._workers) == [0]
    finally:
        globalLogPublisher.removeObserver(observe)
        await supervisor.stopService()


# --- SIGHUP --------------------------------------------------------------------------


def _start_stream(proc: LectrProcess) -> tuple[threading.Thread, threading.Event, dict]:
    """A streamed chat completion through the proxy, in a thread."""
    return proc.start_stream(TOKEN, OPENAI_KEY, "Hangups")


@pytest.mark.slow
def test_sighup_stops_in_order_and_lets_a_stream_finish(tmp_path, db_url):
    """SIGHUP (a closed terminal, ``kill -HUP``) used to kill Lectr at once:
    the stream in flight was cut and the usage rows still in memory were
    lost. It now stops in order, as on SIGTERM."""
    fake = FakeProviderProcess(interval=0.3)
    proc = LectrProcess(
        base_env(
            DATABASE_URL=db_url,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_ADMIN_TOKEN=TOKEN,
            LECTR_SHUTDOWN_GRACE="20",
            LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
        ),
        cwd=tmp_path,
    )
    try:
        proc.wait_ready()
        reader, first_bytes, outcome = _start_stream(proc)
        assert first_bytes.wait(20), proc.output
        proc.proc.send_signal(signal.SIGHUP)
        reader.join(30)
        assert outcome.get("status") == 200, (outcome, proc.output)
        assert outcome["body"].rstrip().endswith(b"data: [DONE]"), outcome
        assert proc.wait_exit(60) == 0, proc.output
        assert "Received SIGHUP, shutting down." in proc.output
        assert "Server Shut Down." in proc.output and "Traceback" not in proc.output
    finally:
        proc.kill()
        fake.stop()
    rows = admin_execute(db_url, "SELECT status FROM request_logs")
    assert rows == [(200,)], proc.output  # the final flush wrote the stream's row


@pytest.mark.slow
def test_a_hangup_of_the_whole_process_group_stops_the_workers_in_order(tmp_path, db_url):
    """The terminal of ``twistd --nodaemon lectr --workers 2`` closes: SIGHUP
    reaches the supervisor and every worker at once. All of them used to die
    on the spot; now the supervisor stops the workers in order."""
    fake = FakeProviderProcess(interval=0.3)
    popen = functools.partial(subprocess.Popen, start_new_session=True)
    with mock.patch("tests.support.process.subprocess.Popen", popen):
        proc = LectrProcess(
            base_env(
                DATABASE_URL=db_url,
                ENCRYPTION_KEY=new_master_key(),
                LECTR_ADMIN_TOKEN=TOKEN,
                LECTR_WORKERS="2",
                LECTR_SHUTDOWN_GRACE="20",
                LECTR_OPENAI_BASE_URL=fake.origin + "/openai",
            ),
            cwd=tmp_path,
        )
    workers: list[int] = []
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        workers = _workers_of(proc.proc.pid)
        reader, first_bytes, outcome = _start_stream(proc)
        assert first_bytes.wait(20), proc.output
        os.killpg(proc.proc.pid, signal.SIGHUP)
        reader.join(30)
        assert outcome.get("status") == 200, (outcome, proc.output)
        assert outcome["body"].rstrip().endswith(b"data: [DONE]"), outcome
        assert proc.wait_exit(60) == 0, proc.output
        assert "Server Shut Down." in proc.output and "Traceback" not in proc.output
        assert not [w for w in workers if _alive(w)]
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.kill()
        fake.stop()
    rows = admin_execute(db_url, "SELECT status FROM request_logs")
    assert rows == [(200,)], proc.output


@pytest.mark.slow
def test_ctrl_c_with_workers_stops_without_tracebacks(tmp_path, db_url):
    """Ctrl-C sends SIGINT to the whole process group: each worker began to
    stop, then the supervisor's SIGTERM made Twisted raise
    ReactorNotRunning, and every worker logged a traceback (systemd's stop,
    SIGTERM to every process of the service, did the same)."""
    popen = functools.partial(subprocess.Popen, start_new_session=True)
    with mock.patch("tests.support.process.subprocess.Popen", popen):
        proc = LectrProcess(
            base_env(
                DATABASE_URL=db_url,
                ENCRYPTION_KEY=new_master_key(),
                LECTR_WORKERS="2",
                LECTR_SHUTDOWN_GRACE="2",
            ),
            cwd=tmp_path,
        )
    try:
        proc.wait_for_output("Lectr is ready (2 workers)")
        os.killpg(proc.proc.pid, signal.SIGINT)
        assert proc.wait_exit(60) in (0, -signal.SIGINT), proc.output
        # (the double stop request really happened)
        assert "Received SIGTERM, shutting down." in proc.output, proc.output
        assert "Server Shut Down." in proc.output
        assert "Traceback" not in proc.output and "Unhandled" not in proc.output, proc.output
    finally:
        proc.kill()


# --- a stop during start-up ------------------------------------------------------------

UNREACHABLE = "postgresql://root@127.0.0.1:1/none"


def _assert_a_plain_stop(proc: LectrProcess) -> None:
    assert proc.wait_exit(60) in (0, -signal.SIGTERM), proc.output
    assert "start-up failed" not in proc.output, proc.output
    assert "Traceback" not in proc.output, proc.output
    assert "Server Shut Down." in proc.output, proc.output


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_database_is_a_stop_not_a_failure(tmp_path):
    """SIGTERM while Lectr still waits for PostgreSQL (a pod stopped during
    its start-up): it printed "lectr: start-up failed: unexpected error
    during start-up: CancelledError" and two tracebacks."""
    proc = LectrProcess(
        base_env(DATABASE_URL=UNREACHABLE, ENCRYPTION_KEY=new_master_key()), cwd=tmp_path
    )
    try:
        proc.wait_for_output("PostgreSQL is not reachable yet")
        proc.proc.send_signal(signal.SIGTERM)
        _assert_a_plain_stop(proc)
    finally:
        proc.kill()


@pytest.mark.slow
def test_sigterm_during_the_migration_is_not_a_migration_failure(tmp_path, db_url):
    """SIGTERM while a node waits for the migration lock (another node
    migrates): the cancellation was reported as "database migration failed:
    CancelledError"."""
    import psycopg2

    from lectr.db.migrate import MIGRATION_LOCK_KEY

    holder = psycopg2.connect(db_url)
    holder.autocommit = True
    proc = None
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        proc = LectrProcess(
            base_env(DATABASE_URL=db_url, ENCRYPTION_KEY=new_master_key()), cwd=tmp_path
        )
        proc.wait_for_output("database pool open")
        deadline = time.monotonic() + 30
        while not admin_execute(
            db_url,
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ):
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.1)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with holder.cursor() as cur:  # the other node is done
            cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        _assert_a_plain_stop(proc)
        assert "migration failed" not in proc.output
    finally:
        holder.close()
        if proc is not None:
            proc.kill()


@pytest.mark.slow
def test_sigterm_while_the_workers_start_is_a_stop_not_a_failure(tmp_path):
    """The same with --workers: the workers stopped as asked, and the
    supervisor reported that as "start-up failed: unexpected error:
    FirstError[...]" with a traceback."""
    proc = LectrProcess(
        base_env(DATABASE_URL=UNREACHABLE, ENCRYPTION_KEY=new_master_key(), LECTR_WORKERS="2"),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_output("PostgreSQL is not reachable yet")
        proc.proc.send_signal(signal.SIGTERM)
        _assert_a_plain_stop(proc)
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_worker_start_up_failure_is_one_clear_line_from_the_supervisor(tmp_path):
    """A worker cannot start: the supervisor's line was "start-up failed:
    unexpected error: FirstError[#0, [Failure instance: ...]]" plus a
    traceback, instead of the one line that says which worker and how."""
    proc = LectrProcess(
        base_env(
            DATABASE_URL=UNREACHABLE,
            ENCRYPTION_KEY=new_master_key(),
            LECTR_WORKERS="2",
            LECTR_DB_CONNECT_TIMEOUT="1",
        ),
        cwd=tmp_path,
    )
    try:
        assert proc.wait_exit(60) != 0
    finally:
        proc.kill()
    supervisor = [line for line in proc.stderr_lines if "exited during start-up" in line]
    assert len(supervisor) == 1, proc.output
    assert re.fullmatch(
        r"lectr: start-up failed: worker [01] exited during start-up \(status 1\)", supervisor[0]
    ), supervisor
    assert "FirstError" not in proc.output, proc.output


# --- the embedded PostgreSQL (development mode) ---------------------------------------


def _pgserver_reachable_dir(tmp_path) -> Path:
    """A data directory the embedded server's own user can always reach.
    Running as root, pgserver runs PostgreSQL as the user ``pgserver``; a
    pytest session starting meanwhile takes group and other permissions off
    ``/tmp/pytest-of-root``, which cut it off (initdb: Permission denied)."""
    base = Path(tempfile.mkdtemp(prefix="lectr-review-dev-"))
    os.chmod(base, 0o755)
    (tmp_path / "dev-data").symlink_to(base)  # found next to the test's other files
    return base / "data"


def _postmaster_pid(pgdata) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.slow
def test_embedded_postgres_is_stopped_after_an_earlier_run_was_killed(tmp_path):
    """Development mode: a run killed outright (SIGKILL, the OOM killer) left
    its PID in pgserver's list of the server's users; every later run then
    left the embedded PostgreSQL running when it stopped, since it never
    was the last user."""
    data = _pgserver_reachable_dir(tmp_path)
    env = base_env(LECTR_DATA_DIR=str(data))
    pgdata = data / "pg"
    first = LectrProcess(env, cwd=tmp_path)
    second = None
    try:
        first.wait_ready(timeout=120)
        first.kill()
        second = LectrProcess(env, cwd=tmp_path)
        second.wait_ready(timeout=120)
        server = _postmaster_pid(pgdata)
        assert server is not None and _alive(server)
        second.stop_cleanly()
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), f"embedded PostgreSQL left running\n{second.output}"
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
        leftover = _postmaster_pid(pgdata)
        if leftover is not None and _alive(leftover):
            os.kill(leftover, signal.SIGTERM)
        shutil.rmtree(data.parent, ignore_errors=True)


def test_workers_creating_the_embedded_database_at_once_all_succeed(pg_server):
    """First ``--workers N`` run in development mode: every worker finds no
    ``lectr`` database and creates it. The losers used to fail with a unique
    violation on pg_database (only DuplicateDatabase was expected), so the
    first run failed to start."""
    from lectr.db.embedded import _ensure_database

    name = f"lectr_review_race_{os.getpid()}"
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            _ensure_database(pg_server.url, name)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert admin_execute(pg_server.url, "SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    finally:
        pg_server.drop_database(name)


@pytest.mark.slow
def test_development_mode_with_workers_starts_and_stops_its_postgres(tmp_path):
    """The two embedded-PostgreSQL defects together, as an operator meets
    them: a first ``--workers 2`` run in development mode must come up (the
    workers race to create the database), and after a worker was killed and
    replaced, the server must still stop with Lectr."""
    data = _pgserver_reachable_dir(tmp_path)
    env = base_env(LECTR_DATA_DIR=str(data), LECTR_WORKERS="2", LECTR_SHUTDOWN_GRACE="2")
    pgdata = data / "pg"
    proc = LectrProcess(env, cwd=tmp_path)
    server = None
    try:
        proc.wait_for_output("Lectr is ready (2 workers)", timeout=120)
        server = _postmaster_pid(pgdata)
        assert server is not None and _alive(server)
        workers = _workers_of(proc.proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        proc.wait_for_output("is back")
        proc.stop_cleanly()
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), f"embedded PostgreSQL left running\n{proc.output}"
    finally:
        proc.kill()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGTERM)
        shutil.rmtree(data.parent, ignore_errors=True)
