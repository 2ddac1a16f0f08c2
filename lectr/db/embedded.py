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


def _start_sync(pgdata: Path) -> tuple[object, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import pgserver
    import psycopg2

    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # pgserver raises bare asserts and CalledProcessError
        raise EmbeddedDatabaseError(
            f"cannot start the embedded PostgreSQL in {pgdata} "
            f"({type(e).__name__}: {str(e).strip() or 'see ' + str(pgdata / 'log')})"
        ) from None
    admin_uri = server.get_uri("postgres")
    conn = psycopg2.connect(admin_uri)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
            if cur.fetchone() is None:
                try:
                    cur.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
                except psycopg2.errors.DuplicateDatabase:
                    pass  # another worker created it at the same moment
    finally:
        conn.close()
    return server, server.get_uri(DATABASE_NAME)


def _stop_sync(server) -> None:
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
