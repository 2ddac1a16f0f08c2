"""PostgreSQL for the tests: a real server, one clean database per test.

``LECTR_TEST_DATABASE_URL`` (or ``DATABASE_URL``) names a server to use; the
role needs CREATEDB. Without either, an embedded PostgreSQL (pgserver) is
started once per test session in a temporary directory. A template database
is migrated once; each test gets ``CREATE DATABASE … TEMPLATE`` of it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2

_counter = itertools.count(1)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def admin_execute(server_url: str, sql: str, args=None) -> list[tuple]:
    conn = psycopg2.connect(server_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


class TestServer:
    """A PostgreSQL server for the session, and databases made on it."""

    def __init__(self) -> None:
        self._embedded = None
        self._tmp: str | None = None
        url = os.environ.get("LECTR_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
        if not url:
            url = self._start_embedded()
        self.url = url
        self.session_tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.template: str | None = None

    def _start_embedded(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        self._tmp = tempfile.mkdtemp(prefix="lectr-test-pg-")
        os.chmod(self._tmp, 0o755)
        self._embedded = pgserver.get_server(Path(self._tmp) / "pg", cleanup_mode="delete")
        return self._embedded.get_uri("postgres")

    @property
    def is_embedded(self) -> bool:
        return self._embedded is not None

    def create_template(self) -> str:
        from lectr.db.migrate import upgrade_sync

        name = f"lectr_tpl_{self.session_tag}"
        admin_execute(self.url, f'CREATE DATABASE "{name}"')
        upgrade_sync(with_database(self.url, name))
        self.template = name
        return name

    def create_database(self, *, migrated: bool = True) -> tuple[str, str]:
        name = f"lectr_t_{self.session_tag}_{next(_counter)}"
        if migrated:
            if self.template is None:
                self.create_template()
            admin_execute(self.url, f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        else:
            admin_execute(self.url, f'CREATE DATABASE "{name}"')
        return name, with_database(self.url, name)

    def drop_database(self, name: str) -> None:
        admin_execute(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self.template:
            self.drop_database(self.template)
        if self._embedded is not None:
            self._embedded.cleanup()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
