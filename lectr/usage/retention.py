"""Request-log retention: ``LECTR_REQUEST_LOG_RETENTION_DAYS``.

Every hour (and a minute after start-up), rows older than the retention
period are deleted oldest first, in batches of ``batch`` rows with a short
pause between batches, so that the deletes never hold a long lock or a long
transaction. Nodes take turns through an advisory lock: when another node is
deleting, this one skips the round. The job survives every failure (it logs
and tries again at the next round).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry


class RequestLogRetention:
    _log = Logger()

    def __init__(
        self,
        store,
        *,
        days: int,
        reactor,
        metrics: Registry,
        interval: float = 3600.0,
        first_delay: float = 60.0,
        batch: int = 5000,
        pause: float = 0.2,
    ) -> None:
        self._store = store
        self._days = days
        self._reactor = reactor
        self._interval = interval
        self._first_delay = first_delay
        self._batch = batch
        self._pause = pause
        self._loop = LoopingCall(self._round_safely)
        self._loop.clock = reactor
        self._first = None
        self._stopping = False
        self._m_expired = metrics.counter(
            "lectr_usage_rows_expired_total", "Request-log rows deleted by the retention job"
        )

    def start(self) -> None:
        self._first = self._reactor.callLater(self._first_delay, self._begin)

    def _begin(self) -> None:
        self._first = None
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        self._stopping = True
        if self._first is not None and self._first.active():
            self._first.cancel()
        if self._loop.running:
            self._loop.stop()

    async def run_once(self) -> int:
        """Delete everything past retention, batch by batch; the number of
        rows deleted (0 when another node holds the lock)."""
        now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
        cutoff = now - timedelta(days=self._days)
        total = 0
        while not self._stopping:
            deleted = await self._store.delete_older_than(cutoff, self._batch)
            if deleted is None:
                break  # another node is at it
            total += deleted
            self._m_expired.inc(deleted)
            if deleted < self._batch:
                break
            await deferLater(self._reactor, self._pause)
        if total:
            self._log.info(
                "request log retention: deleted {n} rows older than {days} days",
                n=total,
                days=self._days,
            )
        return total

    def _round_safely(self) -> Deferred:
        d = Deferred.fromCoroutine(self.run_once())

        def failed(failure) -> None:
            if failure.check(DatabaseUnavailable):
                self._log.info("request log retention skipped: database unavailable")
            else:
                self._log.failure("request log retention failed", failure)

        d.addErrback(failed)
        return d
