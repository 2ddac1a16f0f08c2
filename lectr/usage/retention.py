"""The request-log partitions: made ahead of time, dropped when expired.

``request_logs`` is partitioned by range of ``created_at`` (migration 0008).
This job, run at start-up and then every hour on every node (one node at a
time does the work: an advisory lock), keeps it in shape:

1. **Partitions ahead.** It creates partitions from the end of the newest one
   until at least a week ahead. Their width follows
   ``LECTR_REQUEST_LOG_RETENTION_DAYS``: a day (from 00:00 UTC) when rows are
   kept 1 to 92 days, so retention is precise to the day; a week (from Monday
   00:00 UTC) when they are kept longer or forever (``0``), so the partition
   count stays small (52 a year). Widths may change between rounds: a new
   partition starts where the last one ends. If the newest partition ended
   before today (every node was down for a while), the job starts from today.
2. **The default partition** (``request_logs_default``) receives rows that no
   partition covers: dated in a gap, older than the first partition, or too
   far in the future (a skewed clock). When a partition is created for a
   range, the default partition's rows of that range move into it; rows
   elsewhere stay there (queries read them, as they read every partition
   their range needs), are counted in ``lectr_request_log_default_rows``, and
   expire with retention row by row.
3. **Retention** (``LECTR_REQUEST_LOG_RETENTION_DAYS`` > 0): every partition
   whose whole range is older than the retention period is dropped (one
   statement, no vacuum debt); a partition that straddles the cutoff is kept
   until all of it is past (at most a day, or a week, longer than asked);
   expired rows of the default partition are deleted in batches of
   ``batch`` with a short pause between batches.

Each create or drop is its own short transaction, holding the maintenance
lock and a 2 s ``lock_timeout``: when the table is busy, the job tries again
at the next round. The job survives every failure (it logs and goes on).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry
from lectr.storage.request_logs import MaintenanceBusy, Partition

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
#: the longest retention that gets daily partitions
DAILY_UP_TO_DAYS = 92


def partition_width(retention_days: int) -> timedelta:
    return DAY if 0 < retention_days <= DAILY_UP_TO_DAYS else WEEK


def _floor(t: datetime, width: timedelta) -> datetime:
    day = t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday()) if width == WEEK else day


def plan_partitions(
    existing: list[Partition], now: datetime, width: timedelta, ahead: timedelta
) -> list[tuple[str, datetime, datetime]]:
    """(name, start, end) of the partitions to create so that ``now +
    ahead`` is covered, each ending on a ``width`` boundary."""
    ends = [p.end for p in existing if not p.default and p.end is not None]
    today = _floor(now, DAY)
    start = max(ends) if ends else _floor(now, width)
    if start < today:
        # a gap (no round ran for a while): its rows are in the default
        # partition; start again from today, never overlapping the newest
        start = max(start, _floor(now, width))
    wanted = []
    while start < now + ahead:
        end = _floor(start, width) + width
        wanted.append((f"request_logs_p{start:%Y%m%d}", start, end))
        start = end
    return wanted


@dataclass(frozen=True, slots=True)
class Round:
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    deleted: int = 0  # rows of the default partition
    busy: bool = False  # another node (or a lock) kept this round short


class RequestLogMaintenance:
    _log = Logger()

    def __init__(
        self,
        store,
        *,
        days: int,
        reactor,
        metrics: Registry,
        interval: float = 3600.0,
        batch: int = 5000,
        pause: float = 0.2,
        ahead: timedelta | None = None,
    ) -> None:
        self._store = store
        self._days = days
        self._reactor = reactor
        self._interval = interval
        self._batch = batch
        self._pause = pause
        self.width = partition_width(days)
        self._ahead = ahead if ahead is not None else (WEEK if self.width == DAY else 2 * WEEK)
        self._loop = LoopingCall(self._round_safely)
        self._loop.clock = reactor
        self._stopping = False
        self._partitions = 0
        self._default_rows = 0
        self._m_expired = metrics.counter(
            "lectr_usage_rows_expired_total",
            "Request-log rows deleted one by one by retention (from the default partition)",
        )
        self._m_created = metrics.counter(
            "lectr_request_log_partitions_created_total", "Request-log partitions created"
        )
        self._m_dropped = metrics.counter(
            "lectr_request_log_partitions_dropped_total",
            "Request-log partitions dropped by retention",
        )
        metrics.callback_gauge(
            "lectr_request_log_partitions",
            "Partitions of request_logs (as last counted)",
            lambda: self._partitions,
            mode="livemax",
        )
        metrics.callback_gauge(
            "lectr_request_log_default_rows",
            "Rows in the default partition of request_logs (as last counted, up to 1,000,000)",
            lambda: self._default_rows,
            mode="livemax",
        )

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        self._stopping = True
        if self._loop.running:
            self._loop.stop()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._reactor.seconds(), UTC)

    async def run_once(self) -> Round:
        """One round: partitions ahead, then retention."""
        created, dropped, deleted = [], [], 0
        try:
            existing = await self._store.partitions()
            for name, start, end in plan_partitions(existing, self._now(), self.width, self._ahead):
                if self._stopping:
                    break
                if await self._store.create_partition(name, start, end):
                    created.append(name)
                    self._m_created.inc()
            if self._days:
                dropped, deleted = await self._expire(existing)
        except MaintenanceBusy as e:
            self._log.info("request log partitions: {reason}; next round in an hour", reason=str(e))
            return Round(tuple(created), tuple(dropped), deleted, busy=True)
        finally:
            if created:
                self._log.info("request log partitions created: {names}", names=", ".join(created))
        try:
            self._partitions = len(await self._store.partitions())
            self._default_rows = await self._store.default_rows(1_000_000)
        except DatabaseUnavailable:
            pass
        return Round(tuple(created), tuple(dropped), deleted)

    async def _expire(self, existing: list[Partition]) -> tuple[list[str], int]:
        cutoff = self._now() - timedelta(days=self._days)
        dropped = []
        for p in existing:
            if self._stopping:
                break
            if not p.default and p.end is not None and p.end <= cutoff:
                await self._store.drop_partition(p.name)
                dropped.append(p.name)
                self._m_dropped.inc()
        if dropped:
            self._log.info(
                "request log retention: dropped partitions {names} (older than {days} days)",
                names=", ".join(dropped),
                days=self._days,
            )
        deleted = 0
        while not self._stopping:
            n = await self._store.delete_default_older_than(cutoff, self._batch)
            if n is None:
                raise MaintenanceBusy("another node is maintaining the request-log partitions")
            deleted += n
            self._m_expired.inc(n)
            if n < self._batch:
                break
            await deferLater(self._reactor, self._pause)
        if deleted:
            self._log.info(
                "request log retention: deleted {n} rows of the default partition older "
                "than {days} days",
                n=deleted,
                days=self._days,
            )
        return dropped, deleted

    def _round_safely(self) -> Deferred:
        d = Deferred.fromCoroutine(self.run_once())

        def failed(failure) -> None:
            if failure.check(DatabaseUnavailable):
                self._log.info("request log maintenance skipped: database unavailable")
            else:
                self._log.failure("request log maintenance failed", failure)

        d.addErrback(failed)
        return d
