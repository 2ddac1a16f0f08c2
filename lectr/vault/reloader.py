"""Serialized, coalescing reloads of a per-org cache.

A cache that mirrors rows of many orgs is refreshed from change
notifications (``<kind>:<org id>``) and fully reloaded after a listener
reset. Running those reloads concurrently would let an older read finish
after a newer one and put stale rows back. So reloads run one at a time:
notifications that arrive while one runs are gathered and reloaded together
afterwards (one query for many orgs), and a reload always starts after the
notification that asked for it, hence sees the change it announced.

A failed reload (database unreachable) is logged and retried with backoff;
the cache keeps serving what it had meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure


class OrgCacheReloader:
    _log = Logger()

    def __init__(
        self,
        name: str,
        *,
        load_orgs: Callable[[list[str]], Awaitable[None]],
        load_all: Callable[[], Awaitable[None]],
        reactor,
        min_retry: float = 0.5,
        max_retry: float = 30.0,
    ) -> None:
        self.name = name
        self._load_orgs = load_orgs
        self._load_all = load_all
        self._reactor = reactor
        self._min_retry = min_retry
        self._max_retry = max_retry
        self._retry_delay = min_retry
        self._pending: set[str] = set()
        self._full = False
        self._waiters: list[Deferred[None]] = []
        self._running: Deferred | None = None
        self._retry_call = None
        self._active = False  # paused until start(): requests accumulate
        self._stopped = False

    # --- requests ---------------------------------------------------------------

    def org_changed(self, org_id: str) -> None:
        """Reload one org's rows soon (a notification handler)."""
        if self._stopped:
            return
        self._pending.add(org_id)
        self._kick()

    def reset(self) -> None:
        """Reload everything soon (after a listener reconnect)."""
        if self._stopped:
            return
        self._full = True
        self._kick()

    def refresh(self, org_id: str) -> Deferred[None]:
        """Reload one org and fire once a reload that started after this call
        has finished (read-your-writes for this process's own changes).
        Fails if that reload fails (a retry is scheduled anyway)."""
        d: Deferred[None] = Deferred()
        if self._stopped:
            d.callback(None)
            return d
        self._pending.add(org_id)
        self._waiters.append(d)
        self._kick()
        return d

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Begin reloading (whatever was requested so far runs now)."""
        self._active = True
        self._kick()

    def stop(self) -> None:
        self._stopped = True
        self._active = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._running is not None:
            self._running.cancel()
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.called:
                w.callback(None)

    @property
    def idle(self) -> bool:
        return self._running is None and not self._pending and not self._full

    # --- machinery ----------------------------------------------------------------

    def _kick(self) -> None:
        if not self._active or self._running is not None:
            return
        if self._retry_call is not None and self._retry_call.active():
            return  # backing off after a failure; the retry picks this up
        if not (self._pending or self._full):
            return
        self._running = ensureDeferred(self._run())
        self._running.addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        self._running = None
        if not failure.check(CancelledError):
            self._log.failure("{name} cache reloader crashed", failure, name=self.name)

    async def _run(self) -> None:
        try:
            while self._active and (self._pending or self._full):
                waiters, self._waiters = self._waiters, []
                full, self._full = self._full, False
                orgs, self._pending = self._pending, set()
                try:
                    if full:
                        await self._load_all()
                    else:
                        await self._load_orgs(sorted(orgs))
                except CancelledError:
                    raise
                except Exception as e:
                    self._failed(full, orgs, waiters, e)
                    return
                self._retry_delay = self._min_retry
                for w in waiters:
                    if not w.called:
                        w.callback(None)
        finally:
            self._running = None

    def _failed(self, full: bool, orgs: set[str], waiters: list[Deferred], e: Exception) -> None:
        # keep what was asked for, and try again later
        if full:
            self._full = True
        self._pending |= orgs
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self._max_retry)
        self._log.warn(
            "{name} cache: reload failed ({error}); retrying in {delay:.1f}s",
            name=self.name,
            error=f"{type(e).__name__}: {e}",
            delay=delay,
        )
        self._retry_call = self._reactor.callLater(delay, self._retry)
        for w in waiters:
            if not w.called:
                w.errback(Failure(e))

    def _retry(self) -> None:
        self._retry_call = None
        self._kick()
