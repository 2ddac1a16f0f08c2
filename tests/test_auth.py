"""The key cache: hits without the database, coalesced misses, negative
cache, rate-limited misses, notification-driven eviction, refresh."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from lectr.managers.auth import RATE_LIMITED, UNKNOWN, Authenticator
from lectr.managers.orgs import OrgManager, hash_key
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore


class CountingStore(ApiKeyStore):
    def __init__(self, db) -> None:
        super().__init__(db)
        self.lookups = 0

    async def lookup(self, key_hash):
        self.lookups += 1
        return await super().lookup(key_hash)


@pytest.fixture
def setup(database):
    store = CountingStore(database)
    orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
    return store, orgs


@pytest_twisted.ensureDeferred
async def test_hit_after_first_lookup_and_coalescing(setup):
    store, orgs = setup
    org, issued = await orgs.create_org("Acme")
    auth = Authenticator(store, reactor=reactor)
    h = hash_key(issued.plaintext.reveal())
    assert auth.cached(h) is None
    results = await gatherResults([auth.lookup(h) for _ in range(20)])
    assert store.lookups == 1  # twenty concurrent misses, one query
    assert all(r.org_id == org.id for r in results)
    assert auth.cached(h).key_id == issued.key.id


@pytest_twisted.ensureDeferred
async def test_negative_cache_expires(setup):
    store, _ = setup
    clock = Clock()
    auth = Authenticator(store, reactor=clock, negative_ttl=5.0)
    h = hash_key("lc_00000000-0000-4000-8000-000000000000")
    assert await auth.lookup(h) is None
    assert auth.cached(h) is UNKNOWN
    clock.advance(6)
    assert auth.cached(h) is None


@pytest_twisted.ensureDeferred
async def test_flood_of_unknown_keys_is_rate_limited(setup):
    store, _ = setup
    clock = Clock()
    auth = Authenticator(store, reactor=clock, miss_rate=10, miss_burst=10)
    import uuid

    hashes = [hash_key(f"lc_{uuid.uuid4()}") for _ in range(50)]
    results = await gatherResults([auth.lookup(h) for h in hashes])
    assert results[:10] == [None] * 10  # looked up: unknown
    assert results[10:] == [RATE_LIMITED] * 40  # refused without a query
    assert store.lookups == 10
    clock.advance(1.0)
    await auth.lookup(hash_key(f"lc_{uuid.uuid4()}"))
    assert store.lookups == 11


@pytest_twisted.ensureDeferred
async def test_notifications_evict(setup):
    store, orgs = setup
    org, first = await orgs.create_org("Acme")
    second = await orgs.create_key(org.id, "ci")
    auth = Authenticator(store, reactor=reactor)
    h1, h2 = hash_key(first.plaintext.reveal()), hash_key(second.plaintext.reveal())
    await auth.lookup(h1)
    await auth.lookup(h2)
    auth.key_changed(second.key.id)
    assert auth.cached(h2) is None and auth.cached(h1) is not None
    await auth.lookup(h2)
    auth.org_changed(org.id)
    assert auth.cached(h1) is None and auth.cached(h2) is None
    await auth.lookup(h1)
    auth.clear()
    assert auth.cached(h1) is None


@pytest_twisted.ensureDeferred
async def test_eviction_during_a_lookup_does_not_cache_stale_state(setup):
    store, orgs = setup
    org, issued = await orgs.create_org("Acme")
    auth = Authenticator(store, reactor=reactor)
    h = hash_key(issued.plaintext.reveal())
    d = auth.lookup(h)
    auth.org_changed(org.id)  # a change lands while the query is in flight
    assert (await d) is not None
    assert auth.cached(h) is None  # not cached: the answer may predate the change


@pytest_twisted.ensureDeferred
async def test_refresh_covers_lost_notifications(setup):
    store, orgs = setup
    org, issued = await orgs.create_org("Acme")
    other = await orgs.create_key(org.id, "ci")
    auth = Authenticator(store, reactor=reactor)
    h, h2 = hash_key(issued.plaintext.reveal()), hash_key(other.plaintext.reveal())
    await auth.lookup(h)
    await auth.lookup(h2)
    # Changes whose notifications this node never heard:
    await orgs.set_enabled(org.id, False)
    await orgs.revoke_key(org.id, other.key.id)
    assert auth.cached(h).org_enabled is True
    await auth.refresh()
    assert auth.cached(h).org_enabled is False
    assert auth.cached(h2) is None
