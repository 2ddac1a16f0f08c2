"""Alembic environment.

Lectr runs migrations itself at start-up (``lectr.db.migrate``), handing this
script an open connection inside a transaction that already holds the
migration advisory lock. Run by hand (``alembic upgrade head`` next to
``alembic.ini``), it connects to ``DATABASE_URL`` and takes the same lock.
"""

import os

from alembic import context

from lectr.db.schema import metadata

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        transactional_ddl=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from lectr.db.migrate import locked_connection

    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL to the database to migrate")
    with locked_connection(url) as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
