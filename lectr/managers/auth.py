"""Authenticating Lectr keys on the proxy's hot path.

A presented key is format-checked, hashed (SHA-256) and looked up in memory.
PostgreSQL is asked only on a miss; concurrent misses for one hash share a
single query; unknown hashes are remembered for a few seconds (the negative
cache), and misses are rate limited so a flood of random keys cannot turn
into a flood of queries.

Coherence: ``key:<id>`` and ``org:<id>`` notifications evict the affected
entries at once (a revoked key or a disabled org stops working on every node
as soon as the notification arrives); a periodic refresh re-reads every
cached key in one query, covering notifications lost without a reconnect;
a listener reset clears everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry
from lectr.storage.api_keys import ApiKeyStore, KeyIdentity

#: Returned by ``cached`` when the hash is known not to be an active key.
UNKNOWN = object()
#: Returned by ``lookup`` when misses are being rate limited: the key was
#: not checked (the proxy answers 503, which SDKs retry, not 401).
RATE_LIMITED = object()


class _TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        # (the reactor's clock is the wall clock: a step back is no time at all,
        # not a debt of tokens that would refuse every miss until it is paid)
        elapsed = max(0.0, now - self._last)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Authenticator:
    _log = Logger()

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        reactor,
        metrics: Registry | None = None,
        negative_ttl: float = 5.0,
        negative_max: int = 100_000,
        miss_rate: float = 200.0,
        miss_burst: float = 400.0,
        refresh_interval: float = 30.0,
    ) -> None:
        self._store = store
        self._reactor = reactor
        self._positive: dict[str, KeyIdentity] = {}
        self._by_key: dict[str, str] = {}  # key id -> hash
        self._by_org: dict[str, set[str]] = {}  # org id -> hashes
        # hash -> expiry, on the reactor's clock, i.e. the wall clock (see cached)
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._negative_ttl = negative_ttl
        self._negative_max = negative_max
        # hash -> (generation it began in, its waiters)
        self._inflight: dict[str, tuple[int, list[Deferred]]] = {}
        self._generation = 0  # bumped by every eviction: stale lookups do not repopulate
        self._bucket = _TokenBucket(miss_rate, miss_burst, reactor.seconds)
        self._refresher = LoopingCall(self._refresh_safely)
        self._refresher.clock = reactor
        self._refresh_interval = refresh_interval
        registry = metrics or Registry()
        self._m_lookups = registry.counter(
            "lectr_auth_lookups_total", "Key lookups by outcome", ["outcome"]
        )
        registry.callback_gauge(
            "lectr_auth_cached_keys",
            "Active keys cached in memory",
            lambda: len(self._positive),
            mode="livemax",  # every worker caches the same keys
        )

    # --- lifecycle ---------------------------------------------------------------

    def subscribe(self, listener) -> None:
        listener.subscribe("key", self.key_changed)
        listener.subscribe("org", self.org_changed)
        listener.on_reset(self.clear)

    def start(self) -> None:
        self._refresher.start(self._refresh_interval, now=False)

    def stop(self) -> None:
        if self._refresher.running:
            self._refresher.stop()

    # --- lookups -----------------------------------------------------------------

    def cached(self, key_hash: str) -> KeyIdentity | object | None:
        """The identity (hit), ``UNKNOWN`` (negative hit) or None (miss)."""
        ident = self._positive.get(key_hash)
        if ident is not None:
            self._m_lookups.inc(1, "hit")
            return ident
        expiry = self._negative.get(key_hash)
        if expiry is not None:
            # An expiry further away than the TTL: the (wall) clock has been
            # stepped back since; without the upper bound the hash would stay
            # "unknown" for as long as the step (a key created meanwhile
            # refused for hours). Taken as expired: one more query at most.
            # (No second, steady clock as for the admin API's JWKS: a step
            # back unseen here costs at most one more TTL, a few seconds,
            # and this path keeps one clock read per request.)
            if 0 < expiry - self._reactor.seconds() <= self._negative_ttl:
                self._m_lookups.inc(1, "negative_hit")
                return UNKNOWN
            del self._negative[key_hash]
        return None

    def lookup(self, key_hash: str) -> Deferred[KeyIdentity | None]:
        """Ask the database (after a ``cached`` miss). Concurrent lookups of
        one hash share a query, unless a key or org change was heard since
        that query began: its answer may predate the change (a revoked key,
        a disabled org), so a lookup begun after the notification asks
        again. Fails with DatabaseUnavailable when the database cannot
        answer; answers ``RATE_LIMITED`` when misses are being rate limited
        (a flood of unknown keys)."""
        current = self._inflight.get(key_hash)
        if current is not None and current[0] == self._generation:
            follower: Deferred = Deferred()
            current[1].append(follower)
            return follower
        first: Deferred = Deferred()
        if not self._bucket.take():
            self._m_lookups.inc(1, "rate_limited")
            first.callback(RATE_LIMITED)
            return first
        self._m_lookups.inc(1, "miss")
        generation = self._generation
        waiters = [first]
        entry = self._inflight[key_hash] = (generation, waiters)

        def done(result: Any) -> None:
            if self._inflight.get(key_hash) is entry:  # (not a newer lookup's)
                del self._inflight[key_hash]
            failed = isinstance(result, Failure)
            if not failed and generation == self._generation:
                if result is None:
                    self._remember_unknown(key_hash)
                else:
                    self._remember(key_hash, result)
            for waiter in waiters:
                if not waiter.called:  # a cancelled waiter has fired already
                    if failed:
                        waiter.errback(result)
                    else:
                        waiter.callback(result)

        Deferred.fromCoroutine(self._store.lookup(key_hash)).addBoth(done)
        return first

    def _remember(self, key_hash: str, ident: KeyIdentity) -> None:
        self._positive[key_hash] = ident
        self._by_key[ident.key_id] = key_hash
        self._by_org.setdefault(ident.org_id, set()).add(key_hash)
        self._negative.pop(key_hash, None)

    def _remember_unknown(self, key_hash: str) -> None:
        self._negative[key_hash] = self._reactor.seconds() + self._negative_ttl
        self._negative.move_to_end(key_hash)
        while len(self._negative) > self._negative_max:
            self._negative.popitem(last=False)

    # --- invalidation --------------------------------------------------------------

    def _forget(self, key_hash: str) -> None:
        ident = self._positive.pop(key_hash, None)
        if ident is not None:
            self._by_key.pop(ident.key_id, None)
            hashes = self._by_org.get(ident.org_id)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    del self._by_org[ident.org_id]

    def key_changed(self, key_id: str) -> None:
        self._generation += 1
        key_hash = self._by_key.get(key_id)
        if key_hash is not None:
            self._forget(key_hash)
        else:
            # A key this process does not know: most likely a new one, whose
            # hash may have been looked up (and found unknown) moments before
            # its creation committed (a client that tries it at once on
            # another node): forget the short-lived negatives, as for an org.
            self._negative.clear()

    def org_changed(self, org_id: str) -> None:
        self._generation += 1
        for key_hash in list(self._by_org.get(org_id, ())):
            self._forget(key_hash)
        # A newly created key may have been looked up (and found unknown)
        # moments before its commit; forget short-lived negatives too.
        self._negative.clear()

    def clear(self) -> None:
        self._generation += 1
        self._positive.clear()
        self._by_key.clear()
        self._by_org.clear()
        self._negative.clear()

    # --- periodic refresh ------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read every cached key in one query; drop what is no longer
        active, update what changed (e.g. an org's enabled flag)."""
        hashes = list(self._positive)
        if not hashes:
            return
        generation = self._generation
        current = await self._store.lookup_many(hashes)
        if generation != self._generation:
            return  # an eviction raced us; the next round will catch up
        for key_hash in hashes:
            ident = current.get(key_hash)
            if ident is None:
                self._forget(key_hash)
            elif ident != self._positive.get(key_hash):
                self._forget(key_hash)
                self._remember(key_hash, ident)

    def _refresh_safely(self) -> Deferred:
        d = Deferred.fromCoroutine(self.refresh())

        def failed(failure) -> None:
            if failure.check(DatabaseUnavailable):
                self._log.info("key cache refresh skipped: database unavailable")
            else:
                self._log.failure("key cache refresh failed", failure)

        d.addErrback(failed)
        return d
