"""The embedded PostgreSQL of development mode (the ``pgserver`` package).

It lives in ``<data-dir>/pg``, listens only on a Unix socket in that
directory, is reused across restarts and stopped with Lectr (the last of
several worker processes to exit stops it). pgserver blocks while it runs
``initdb`` and ``pg_ctl``, so every call here runs in a thread.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

DATABASE_NAME = "lectr"


class EmbeddedDatabaseError(Exception):
    pass


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver counts the processes using the server (their PIDs, in
    ``.handle_pids.json``) and stops it when the last one leaves. A process
    killed outright (SIGKILL, the OOM killer, a worker that crashed) never
    leaves: its PID stayed listed for ever, and the server was then never
    stopped again. Forget the PIDs of processes that are gone."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    handles = DiskList(pgdata / ".handle_pids.json")
    with PostgresServer._lock:  # pgserver's own inter-process lock
        try:
            pids = handles.get()
        except (OSError, ValueError):
            return  # pgserver will report it
        living = [pid for pid in pids if alive(pid)]
        if living != pids:
            handles.put(living)


def _start_sync(pgdata: Path) -> tuple[object, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import pgserver

    try:
        # made here, not by pgserver: it checks, then mkdir()s without
        # exist_ok, and the second of two workers starting together failed
        pgdata.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # pgserver raises bare asserts and CalledProcessError
        raise EmbeddedDatabaseError(
            f"cannot start the embedded PostgreSQL in {pgdata} "
            f"({type(e).__name__}: {str(e).strip() or 'see ' + str(pgdata / 'log')})"
        ) from None
    _ensure_database(server.get_uri("postgres"), DATABASE_NAME)
    return server, server.get_uri(DATABASE_NAME)


def _ensure_database(admin_uri: str, name: str) -> None:
    """Create database ``name`` unless it exists. Several workers may try at
    the same moment: the loser gets DuplicateDatabase, or, when both passed
    the check before either committed, a unique violation on
    ``pg_database``'s name index (which made a first ``--workers`` run in
    development mode fail)."""
    import psycopg2

    conn = psycopg2.connect(admin_uri)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                try:
                    cur.execute(f'CREATE DATABASE "{name}"')
                except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                    pass  # another worker created it at the same moment
    finally:
        conn.close()


def _stop_sync(server) -> None:
    _forget_dead_handles(server.pgdata)  # so that the last one out stops it
    server.cleanup()


class EmbeddedPostgres:
    _log = Logger()

    def __init__(self, pgdata: Path, *, reactor) -> None:
        self.pgdata = pgdata
        self._reactor = reactor
        self._server = None

    async def start(self) -> str:
        """Start (or join) the server; return its connection URL."""
        self._log.info("starting embedded PostgreSQL in {path}", path=str(self.pgdata))
        self._server, dsn = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _start_sync, self.pgdata
        )
        return dsn

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), _stop_sync, server
            )
            self._log.info("embedded PostgreSQL released")
