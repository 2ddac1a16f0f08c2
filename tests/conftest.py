from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from lectr.db.database import Database
from tests.support.pg import TestServer


@pytest.fixture(scope="session")
def pg_server():
    server = TestServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def db_url(pg_server):
    """A fresh, migrated database; its URL."""
    name, url = pg_server.create_database()
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def empty_db_url(pg_server):
    """A fresh database with no schema."""
    name, url = pg_server.create_database(migrated=False)
    yield url
    pg_server.drop_database(name)


@pytest_twisted.async_yield_fixture
async def database(db_url):
    db = Database(db_url, reactor=reactor, min_size=1, max_size=5)
    await db.start()
    yield db
    await db.close()
