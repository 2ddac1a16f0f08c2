"""Running the alembic migrations in ``migrations/`` (installed as
``lectr.migrations``).

Alembic and SQLAlchemy are synchronous, so the public coroutines run them in
a thread. Every run holds a PostgreSQL advisory lock for its whole
transaction: when several replicas start at once, one migrates and the
others wait, then find the schema at head and do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from lectr.db.database import describe_error

# "LECTRMIG" as a 64-bit integer: the key of the migration advisory lock.
MIGRATION_LOCK_KEY = int.from_bytes(b"LECTRMIG", "big") & 0x7FFFFFFFFFFFFFFF

_log = Logger()


class MigrationError(Exception):
    pass


def migrations_dir() -> Path:
    """``migrations/`` of a source checkout, else the installed copy."""
    source = Path(__file__).resolve().parents[2] / "migrations"
    if (source / "env.py").is_file():
        return source
    return Path(str(resources.files("lectr.migrations")))


def _engine(dsn: str):
    import psycopg2
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(
        "postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn), poolclass=NullPool
    )


@contextlib.contextmanager
def locked_connection(dsn: str) -> Iterator:
    """A SQLAlchemy connection in a transaction holding the migration lock."""
    from sqlalchemy import text

    engine = _engine(dsn)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            yield conn
    finally:
        engine.dispose()


def _alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()
    if len(heads) != 1:
        raise MigrationError(f"the migrations have {len(heads)} heads; merge them")
    return heads[0]


def current_revision_sync(dsn: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade_sync(dsn: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``revision``; return (revision before, revision after)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with locked_connection(dsn) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(_alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def downgrade_sync(dsn: str, revision: str) -> None:
    from alembic import command

    with locked_connection(dsn) as conn:
        command.downgrade(_alembic_config(conn), revision)


async def upgrade(reactor, dsn: str) -> None:
    """Bring the schema to head, in a thread, under the advisory lock."""
    try:
        before, after = await deferToThreadPool(reactor, reactor.getThreadPool(), upgrade_sync, dsn)
    except (MigrationError, CancelledError):
        raise  # CancelledError: Lectr is stopping during start-up
    except Exception as e:
        raise MigrationError(f"database migration failed: {describe_error(e)}") from e
    if before == after:
        _log.info("database schema is current (revision {rev})", rev=after)
    else:
        _log.info(
            "database schema migrated from {before} to {after}",
            before=before or "empty",
            after=after,
        )


async def check_current(reactor, dsn: str) -> None:
    """With --no-migrate: refuse to run against a schema that is behind."""
    current = await deferToThreadPool(reactor, reactor.getThreadPool(), current_revision_sync, dsn)
    head = head_revision()
    if current != head:
        raise MigrationError(
            f"database schema is at revision {current or 'none'} but this Lectr needs {head}; "
            "run once without --no-migrate (or `alembic upgrade head`)"
        )
