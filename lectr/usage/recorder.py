"""The usage recorder: every proxied request becomes one ``request_logs``
row, without the request ever waiting for PostgreSQL.

``record()`` appends to an in-memory buffer and returns. A ``LoopingCall``
flusher (every ``flush_interval`` seconds, and at once when the buffer
reaches ``batch_size``) swaps the buffer out and writes it (Synapse's
client-IP writer is the model): in statements of at most ``statement_rows``
rows, one transaction each, ``parallel`` of them in flight at once on as
many connections when the write is large enough (``SPLIT_MIN`` rows each).
What accumulates while a write is in flight goes in the next one, so under
load the statements grow and their fixed cost is shared by more rows. The
loop body catches and logs everything, so it never stops.

When PostgreSQL cannot take a batch (down, refusing, failing), the rows go
to the spill journal on disk (:mod:`lectr.usage.journal`) and the database is
retried with backoff; while it is down, each tick spills at once. When a
write succeeds again, the journal is replayed one segment per tick. Inserts
skip ``request_id`` values already stored, so a replay never duplicates a
row, even after a crash halfway through one. Rows are dropped only when the
journal's disk budget is exhausted (or a row is rejected by PostgreSQL on its
own, see below), and every drop is counted and logged.

A batch that PostgreSQL rejects for its data (a value out of range, a
malformed id…) is split in halves until the offending rows are alone; only
they are dropped. Common problems (NUL bytes, invalid UTF-8, overlong
strings, counts out of range) are repaired before writing, so those rows are
kept.

The flusher is a write-behind buffer, so a few rows can be lost only if the
process is killed hard (SIGKILL, OOM) between a request and the next flush;
a normal shutdown flushes, or spills, everything.

The flusher shares the reactor with the requests, so what it does in Python
is done in slices of ``PREPARE_SLICE`` rows, one slice per turn of the
reactor: feeding the GenAI metrics and repairing the rows here, building the
statement's column arrays in :mod:`lectr.storage.request_logs`. A batch of
500 prepared in one piece held the reactor for 4-7 ms, which the requests
arriving meanwhile waited out (their p99).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.gateway_metrics import GenAIMetrics
from lectr.metrics import Registry
from lectr.pricing.cost import with_estimates
from lectr.storage.request_logs import PREPARE_SLICE
from lectr.usage.journal import AppendResult, SpillJournal
from lectr.usage.model import (
    COUNT_MAX,
    RAW_USAGE_MAX,
    USAGE_SOURCES,
    Usage,
    UsageRecord,
    service_tier_of,
)

#: errors that belong to the rows of a batch rather than to the database:
#: the batch is split to find the offending rows. ValueError covers what the
#: driver refuses before sending (a NUL byte, an unencodable string).
_DATA_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, ValueError)

SPILL_DIRNAME = "usage-spill"

PROVIDER_MAX = 64
MODEL_MAX = 256
METHOD_MAX = 32
PATH_MAX = 2048
ERROR_TYPE_MAX = 200
ROUTE_MAX = 256
#: each text in a request's fallback notes (``fallbacks``: provider, model, key name, reason)
FALLBACK_TEXT_MAX = MODEL_MAX
_TEXT_LIMITS = (
    ("provider", PROVIDER_MAX),
    ("model", MODEL_MAX),
    ("method", METHOD_MAX),
    ("path", PATH_MAX),
    ("error_type", ERROR_TYPE_MAX),
    ("route", ROUTE_MAX),
)
_INT32_MAX = COUNT_MAX
_COST_MAX = Decimal(10) ** 15
_SMALLINT_MAX = 2**15 - 1


class _Unavailable(Exception):
    """A batch could not be written for a reason that is not its data.
    ``rows``: those of it neither written nor rejected (what to spill: a
    bisection may have settled some before the database went away)."""

    def __init__(self, rows: Sequence[UsageRecord] = ()) -> None:
        super().__init__()
        self.rows = rows


class InvalidRecord(ValueError):
    """Not a usage row at all (a bug in the caller): dropped, counted."""


def _clean_text(value: str, limit: int) -> str:
    if type(value) is not str:
        value = str(value)
    if len(value) > limit:
        value = value[:limit]
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _clean_count(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        if isinstance(value, float) and math.isfinite(value):
            value = int(value)
        elif isinstance(value, int):  # bool, IntEnum
            value = int(value)
        else:
            return None
    return value if 0 <= value <= _INT32_MAX else None


def _text_ok(value: object, limit: int) -> bool:
    return type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value


def _fallbacks_ok(fallbacks: object) -> bool:
    """Each earlier attempt's note as jsonb takes it: plain ASCII text (the
    client's model name is in there), whole numbers, nulls."""
    return type(fallbacks) is tuple and all(
        type(f) is dict
        and all(
            _text_ok(k, FALLBACK_TEXT_MAX)
            and (v is None or type(v) is int or _text_ok(v, FALLBACK_TEXT_MAX))
            for k, v in f.items()
        )
        for f in fallbacks
    )


def _clean_fallbacks(fallbacks: object) -> tuple[dict, ...]:
    if not isinstance(fallbacks, (tuple, list)):
        return ()
    return tuple(
        {
            _clean_text(k, FALLBACK_TEXT_MAX): (
                v
                if v is None or isinstance(v, int)
                else _clean_text(v, FALLBACK_TEXT_MAX)
                if isinstance(v, str)
                else None
            )
            for k, v in f.items()
        }
        for f in fallbacks
        if isinstance(f, dict)
    )


def _count_ok(value: object) -> bool:
    return value is None or (type(value) is int and 0 <= value <= _INT32_MAX)


def _plainly_clean(r: UsageRecord) -> bool:
    """True for a row that :func:`clean_record` would return unchanged, told
    by its exact types and bounds alone (what the proxy records; about 40 %
    of the full check's cost). False sends the row through the full check,
    which decides: nothing here repairs anything."""
    if type(r) is not UsageRecord:
        return False
    u = r.usage
    created_at = r.created_at
    status = r.status
    attempts = r.attempts
    cost = r.cost_usd
    return (
        type(r.request_id) is str
        and type(r.org_id) is str
        and (r.key_id is None or type(r.key_id) is str)
        and type(created_at) is datetime
        and created_at.tzinfo is not None
        and type(u) is Usage
        and type(status) is int
        and 0 <= status <= _SMALLINT_MAX
        and type(r.latency_ms) is float
        and (r.ttfb_ms is None or type(r.ttfb_ms) is float)
        and type(r.streamed) is bool
        and type(attempts) is int
        and 0 <= attempts <= _SMALLINT_MAX
        and (r.provider_key_id is None or type(r.provider_key_id) is str)
        and type(r.request_bytes) is int
        and r.request_bytes >= 0
        and _text_ok(r.provider, PROVIDER_MAX)
        and _text_ok(r.method, METHOD_MAX)
        and _text_ok(r.path, PATH_MAX)
        and (r.model is None or _text_ok(r.model, MODEL_MAX))
        and (r.error_type is None or _text_ok(r.error_type, ERROR_TYPE_MAX))
        and (r.route is None or _text_ok(r.route, ROUTE_MAX))
        and u.source in USAGE_SOURCES
        and _count_ok(u.prompt_tokens)
        and _count_ok(u.completion_tokens)
        and _count_ok(u.total_tokens)
        and _count_ok(u.cached_tokens)
        and _count_ok(u.cache_creation_tokens)
        and _count_ok(u.reasoning_tokens)
        and _count_ok(u.cache_creation_1h_tokens)
        and _count_ok(u.web_search_requests)
        and (u.service_tier is None or service_tier_of(u.service_tier) is not None)
        and (u.raw is None or _text_ok(u.raw, RAW_USAGE_MAX))
        and (u.model is None or _text_ok(u.model, MODEL_MAX))
        and (cost is None or (type(cost) is Decimal and cost.is_finite() and abs(cost) < _COST_MAX))
        and (not r.fallbacks or _fallbacks_ok(r.fallbacks))
    )


def clean_record(r: UsageRecord) -> UsageRecord:
    """The record with values PostgreSQL would refuse repaired; ``r`` itself
    when nothing needs repair (the common case, checked cheaply). Raises
    InvalidRecord for something that cannot be a row."""
    return r if _plainly_clean(r) else _clean_fully(r)


def _clean_fully(r: UsageRecord) -> UsageRecord:
    """:func:`clean_record`, every value checked and repaired if need be."""
    if (
        not isinstance(r, UsageRecord)
        or type(r.request_id) is not str
        or type(r.org_id) is not str
        or not (r.key_id is None or type(r.key_id) is str)
        or not isinstance(r.created_at, datetime)
        or not isinstance(r.usage, Usage)
        or not isinstance(r.status, int | float)
        or not isinstance(r.latency_ms, int | float)
        or r.provider is None
        or r.method is None
        or r.path is None
    ):
        raise InvalidRecord("not a well-formed UsageRecord")
    changes: dict[str, Any] = {}
    for name, limit in _TEXT_LIMITS:
        value = getattr(r, name)
        if value is not None:
            cleaned = _clean_text(value, limit)
            if cleaned is not value:
                changes[name] = cleaned
    if r.created_at.tzinfo is None:
        changes["created_at"] = r.created_at.replace(tzinfo=UTC)
    status = r.status
    if type(status) is not int or not 0 <= status <= _SMALLINT_MAX:
        status = _clean_count(status) or 0
        changes["status"] = status if status <= _SMALLINT_MAX else 0
    for name in ("latency_ms", "ttfb_ms"):
        value = getattr(r, name)
        if value is not None and type(value) is not float:
            try:
                changes[name] = float(value)
            except (TypeError, ValueError):
                changes[name] = 0.0 if name == "latency_ms" else None
    if type(r.streamed) is not bool:
        changes["streamed"] = bool(r.streamed)
    if type(r.attempts) is not int or not 0 <= r.attempts <= _SMALLINT_MAX:
        changes["attempts"] = min(_clean_count(r.attempts) or 0, _SMALLINT_MAX)
    if r.provider_key_id is not None and type(r.provider_key_id) is not str:
        changes["provider_key_id"] = None
    u = r.usage
    counts = (
        u.prompt_tokens,
        u.completion_tokens,
        u.total_tokens,
        u.cached_tokens,
        u.cache_creation_tokens,
        u.reasoning_tokens,
        u.cache_creation_1h_tokens,
        u.web_search_requests,
    )
    cleaned_counts = tuple(_clean_count(c) for c in counts)
    # (by identity: 3.0 and True equal 3 and 1, but an int column refuses them)
    counts_changed = any(a is not b for a, b in zip(cleaned_counts, counts, strict=True))
    raw = u.raw if u.raw is None else _clean_text(u.raw, RAW_USAGE_MAX)
    served = u.model if u.model is None else _clean_text(u.model, MODEL_MAX)
    tier = service_tier_of(u.service_tier)  # (not a tier Lectr read: none)
    if (
        counts_changed
        or u.source not in USAGE_SOURCES
        or raw is not u.raw
        or served is not u.model
        or tier is not u.service_tier
    ):
        changes["usage"] = Usage(
            *cleaned_counts[:5],
            source=u.source if u.source in USAGE_SOURCES else "none",
            reasoning_tokens=cleaned_counts[5],
            cache_creation_1h_tokens=cleaned_counts[6],
            service_tier=tier,
            web_search_requests=cleaned_counts[7],
            raw=raw,
            model=served,
        )
    if type(r.request_bytes) is not int or r.request_bytes < 0:
        changes["request_bytes"] = _clean_count(r.request_bytes) or 0
    if r.fallbacks and not _fallbacks_ok(r.fallbacks):
        changes["fallbacks"] = _clean_fallbacks(r.fallbacks)
    cost = r.cost_usd
    if cost is not None and (
        not isinstance(cost, Decimal) or not cost.is_finite() or abs(cost) >= _COST_MAX
    ):
        # not a cost Lectr computed: price the row again
        changes["cost_usd"] = None
        changes["pricing"] = None
    return replace(r, **changes) if changes else r


#: rows each statement must get for a write to be split across ``parallel``
#: connections (so 2,000 rows before a write is split in two): a statement has
#: a fixed cost on the server (about 1.2 ms: parsing, analysing and planning
#: the statement, the commit), shared by more rows in one statement: fed
#: 4,500 rows a second, 890-row statements cost PostgreSQL 24-25 µs of CPU
#: per row, 260-row ones 34-35 (``bench/flusher_bench.py --rate``); two
#: connections are for backlogs
SPLIT_MIN = 1_000


def _split(rows: Sequence[UsageRecord], most: int, parallel: int) -> list[Sequence[UsageRecord]]:
    """``rows`` in statements of at most ``most`` rows, of even sizes, and
    in at least ``parallel`` of them when each still gets ``SPLIT_MIN``."""
    n = len(rows)
    if not n:
        return []
    count = max(-(-n // most), min(parallel, n // SPLIT_MIN), 1)
    each = -(-n // count)
    return [rows[i : i + each] for i in range(0, n, each)]


def _chunks(rows: Sequence[UsageRecord], size: int):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300] if first else type(e).__name__


class UsageRecorder:
    """Implements :class:`lectr.usage.model.UsageSink`."""

    _log = Logger()

    def __init__(
        self,
        store,
        *,
        reactor,
        data_dir: Path,
        metrics: Registry,
        flush_interval: float = 1.0,
        batch_size: int = 1_000,
        statement_rows: int = 2_000,
        parallel: int = 2,
        max_buffer: int = 50_000,
        spill_max_bytes: int = 1024**3,
        stall_timeout: float = 5.0,
        retry_max: float = 10.0,
        stop_timeout: float = 10.0,
        run_in_thread: Callable[..., Deferred] | None = None,
        pricing=None,
        pause: Callable[[], Deferred] | None = None,
    ) -> None:
        if batch_size < 1 or max_buffer < batch_size or flush_interval <= 0:
            raise ValueError("need flush_interval > 0 and 1 <= batch_size <= max_buffer")
        if statement_rows < 1 or parallel < 1:
            raise ValueError("need statement_rows >= 1 and parallel >= 1")
        self._store = store
        self._reactor = reactor
        # prices the rows that arrive without a price (lectr.pricing.manager.PricingManager)
        self._pricing = pricing
        self._interval = flush_interval
        self._batch_size = batch_size
        # rows per INSERT: a write takes what the buffer holds, so when the
        # database is the bottleneck the statements grow (fewer, larger
        # statements: each costs PostgreSQL about as much again as 500 rows)
        self._statement_rows = statement_rows
        # statements in flight at once, on as many connections: PostgreSQL
        # inserts the rows and maintains the indexes of each on its own
        # backend (the rollups, updated last, wait for each other briefly)
        self._parallel = parallel
        self._max_buffer = max_buffer
        self._stall_timeout = stall_timeout
        self._retry_max = retry_max
        self._stop_timeout = stop_timeout
        self.journal = SpillJournal(Path(data_dir) / SPILL_DIRNAME, max_bytes=spill_max_bytes)
        if run_in_thread is None:

            def run_in_thread(fn, *args):
                return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

        self._in_thread = run_in_thread
        # fires on a later turn of the reactor: between two slices of a batch
        self._pause = pause or (lambda: deferLater(reactor, 0, lambda: None))

        self._buffer: list[UsageRecord] = []
        self._inflight: Sequence[UsageRecord] = ()
        self._flushing: Deferred | None = None
        self._op_starts: list[float] = []  # when each statement in flight was sent
        self._early = None  # IDelayedCall of an early flush
        self._spills: set[Deferred] = set()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._running = False
        self._stopping = False
        self._stopped = False
        self._db_ok = True
        self._retry_at = 0.0
        self._retry_delay = flush_interval
        self._replay_pending = False

        m = metrics
        self._genai = GenAIMetrics(metrics)
        self._m_recorded = m.counter(
            "lectr_usage_rows_recorded_total", "Usage rows handed to the recorder"
        )
        self._m_written = m.counter(
            "lectr_usage_rows_written_total", "Usage rows inserted into request_logs"
        )
        self._m_duplicates = m.counter(
            "lectr_usage_rows_duplicate_total",
            "Usage rows skipped because their request_id was already stored (replays)",
        )
        self._m_spilled = m.counter(
            "lectr_usage_rows_spilled_total", "Usage rows written to the spill journal"
        )
        self._m_replayed = m.counter(
            "lectr_usage_rows_replayed_total",
            "Usage rows read back from the spill journal and stored",
        )
        self._m_dropped = m.counter(
            "lectr_usage_rows_dropped_total", "Usage rows lost, by reason", ["reason"]
        )
        self._m_flush = m.histogram(
            "lectr_usage_flush_seconds",
            "Time to write one statement of usage rows (one transaction)",
        )
        self._m_failures = m.counter(
            "lectr_usage_flush_failures_total",
            "Batches PostgreSQL could not take (the rows were spilled)",
        )
        m.callback_gauge(
            "lectr_usage_rows_buffered",
            "Usage rows in memory, waiting for (or in) a write",
            lambda: len(self._buffer) + len(self._inflight),
        )
        m.callback_gauge(
            "lectr_usage_spill_bytes",
            "Bytes in the usage spill journal (as last counted)",
            lambda: self.journal.size,
            mode="livemax",  # the journal directory is shared by the workers
        )
        m.callback_gauge(
            "lectr_usage_database_writable",
            "1 while usage rows reach PostgreSQL, 0 while they are spilled",
            lambda: 1 if self._db_ok else 0,
            mode="livemin",  # 0 as soon as one worker spills
        )

    # --- the request path -----------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Queue one row. O(1), never raises, never blocks."""
        try:
            if self._stopped:
                self._drop([record], "after_stop")
                return
            buffer = self._buffer
            buffer.append(record)
            self._m_recorded.inc()
            n = len(buffer)
            if n >= self._batch_size and self._running:
                if n >= self._max_buffer:
                    # writes are not keeping up (or hang): keep memory bounded
                    self._buffer = []
                    self._spill_soon(buffer)
                    self._reactor.callLater(0, self._observe, buffer)
                elif self._flushing is None and self._early is None:
                    self._early = self._reactor.callLater(0, self._early_tick)
        except Exception:
            self._log.failure("usage recorder: could not queue a row")

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the flusher; rows left in the journal by an earlier run are
        replayed once PostgreSQL takes writes."""
        if self._running:
            return
        try:
            self._replay_pending = await self._in_thread(self.journal.has_segments)
        except CancelledError:
            raise  # Lectr is stopping during start-up
        except Exception:
            self._log.failure("usage recorder: cannot read the spill journal")
        if self._replay_pending:
            self._log.info(
                "usage spill journal has rows to replay ({bytes} bytes in {dir})",
                bytes=self.journal.size,
                dir=str(self.journal.directory),
            )
        self._running = True
        d = self._loop.start(self._interval, now=False)
        d.addErrback(lambda f: self._log.failure("usage flusher stopped", f))

    async def stop(self) -> None:
        """Stop the flusher and write (or spill) every row still in memory.
        Call it after the proxy has drained."""
        if self._stopped or self._stopping:
            return
        self._stopping = True
        self._running = False
        if self._loop.running:
            self._loop.stop()
        if self._early is not None and self._early.active():
            self._early.cancel()
        self._early = None
        deadline = self._reactor.seconds() + self._stop_timeout
        try:
            if self._flushing is not None:
                finished = await self._wait(self._flushing, self._stop_timeout)
                if not finished:
                    # a write hangs: spill its rows too (a late commit is
                    # harmless: the replay skips rows already stored)
                    self._log.warn("usage flush still running at shutdown; spilling its rows")
                    await self._spill(list(self._inflight))
            rows = self._take_buffer()
            if rows:
                remaining = deadline - self._reactor.seconds()
                if self._db_ok and remaining > 0:
                    d = ensureDeferred(self._write(rows, spill_on_failure=True))
                    d.addErrback(self._flush_failed)
                    if not await self._wait(d, remaining):
                        self._log.warn("final usage flush timed out; spilling its rows")
                        await self._spill(rows)
                else:
                    await self._spill(rows)
            # from here on a row would be lost: count it instead
            self._stopped = True
            late = self._take_buffer()
            await self._spill(late)
            for d in list(self._spills):
                await self._wait(d, max(deadline - self._reactor.seconds(), 1.0))
        finally:
            self._stopped = True
            try:
                await self._in_thread(self.journal.close)
            except Exception:
                self._log.failure("usage recorder: closing the spill journal failed")

    async def flush_now(self) -> None:
        """Wait for the write in flight, then write what is buffered (and one
        journal segment when a replay is due)."""
        if self._flushing is not None:
            await self._wait(self._flushing, None)
        self._start_flush()
        if self._flushing is not None:
            await self._wait(self._flushing, None)

    async def wait_idle(self) -> None:
        """Wait until no write is in flight (tests, tooling)."""
        while self._flushing is not None:
            await self._wait(self._flushing, None)
        while self._spills:
            await self._wait(next(iter(self._spills)), None)

    @property
    def database_writable(self) -> bool:
        return self._db_ok

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._inflight)

    # --- the flusher ------------------------------------------------------------------

    def _take_buffer(self) -> list[UsageRecord]:
        """Swap the buffer out; its rows feed the GenAI metrics here, once
        each, off the request path."""
        rows, self._buffer = self._buffer, []
        self._observe(rows)
        return rows

    def _observe(self, rows: list[UsageRecord]) -> None:
        try:
            self._genai.observe(rows)
        except Exception:
            self._log.failure("usage recorder: GenAI metrics failed")

    def _early_tick(self) -> None:
        self._early = None
        self._tick()

    def _tick(self) -> None:
        """The LoopingCall body: never raises."""
        try:
            if self._flushing is not None:
                self._check_stall()
            else:
                self._start_flush()
        except Exception:
            self._log.failure("usage flusher tick failed")

    def _start_flush(self) -> None:
        if self._flushing is not None or self._stopped:
            return
        if not self._buffer and not self._replay_pending:
            return
        d = ensureDeferred(self._flush())
        self._flushing = d
        d.addErrback(self._flush_failed)
        d.addBoth(self._flush_done)

    def _flush_failed(self, failure: Failure) -> None:
        self._log.failure("usage flush failed unexpectedly", failure)

    def _flush_done(self, _: object) -> None:
        self._flushing = None
        if self._running and len(self._buffer) >= self._batch_size and self._early is None:
            self._early = self._reactor.callLater(0, self._early_tick)

    def _check_stall(self) -> None:
        """A write has been waiting on PostgreSQL for too long: do not keep
        the new rows only in memory meanwhile."""
        started = min(self._op_starts) if self._op_starts else None
        if (
            started is not None
            and self._buffer
            and self._reactor.seconds() - started > self._stall_timeout
        ):
            rows = self._take_buffer()
            self._log.warn(
                "usage write has been waiting for {seconds:.0f}s; spilling {n} rows",
                seconds=self._reactor.seconds() - started,
                n=len(rows),
            )
            self._spill_soon(rows)

    async def _flush(self) -> None:
        rows, self._buffer = self._buffer, []
        self._inflight = rows  # (counted as buffered meanwhile)
        try:
            rows = await self._prepare(rows)
        finally:
            self._inflight = ()
        if not self._db_ok and self._reactor.seconds() < self._retry_at:
            # PostgreSQL failed a moment ago: no need to wait on it
            await self._spill(rows, clean=False)
            return
        try:
            if not await self._write(rows, spill_on_failure=True, clean=False):
                return
        except CancelledError:
            raise
        except Exception:
            self._log.failure("usage write failed unexpectedly; spilling its rows")
            await self._spill(rows, clean=False)
            return
        if self._replay_pending and not self._stopping:
            await self._replay_one()

    async def _prepare(self, rows: list[UsageRecord]) -> list[UsageRecord]:
        """The rows fed to the GenAI metrics and cleaned (:meth:`_clean`),
        ``PREPARE_SLICE`` at a time, a turn of the reactor each."""
        cleaned: list[UsageRecord] = []
        for i in range(0, len(rows), PREPARE_SLICE):
            if i:
                await self._pause()
            part = rows[i : i + PREPARE_SLICE]
            self._observe(part)
            cleaned += self._clean(part)
        return cleaned

    async def _write(
        self, rows: Sequence[UsageRecord], *, spill_on_failure: bool, clean: bool = True
    ) -> bool:
        """Write ``rows`` in statements, ``parallel`` at a time. True when all
        went to PostgreSQL (or were rejected on their own); False when it
        failed, in which case the unwritten rows were spilled. ``clean``:
        repair them first (False: the caller did, :meth:`_prepare`)."""
        if clean:
            rows = self._clean(rows)
        self._inflight = rows
        try:
            batches = _split(rows, self._statement_rows, self._parallel)
            for i in range(0, len(batches), self._parallel):
                group = batches[i : i + self._parallel]
                outcomes = await DeferredList(
                    [ensureDeferred(self._insert(b)) for b in group], consumeErrors=True
                )
                failed = [b for b, (ok, _) in zip(group, outcomes, strict=True) if not ok]
                if not failed:
                    continue
                errors = [f for ok, f in outcomes if not ok]
                unexpected = [f for f in errors if not f.check(_Unavailable)]
                if unexpected:
                    unexpected[0].raiseException()  # (the caller spills the rows)
                cause = errors[0].value
                self._database_failed(cause.__cause__ or cause)
                if spill_on_failure:
                    # what did not commit: the failed statements' rows not yet
                    # written or rejected, and the statements not sent
                    unsettled = [r for f in errors for r in f.value.rows]
                    unsent = [r for b in batches[i + len(group) :] for r in b]
                    await self._spill(unsettled + unsent, clean=False)
                return False
            return True
        finally:
            self._inflight = ()

    async def _insert(self, batch: Sequence[UsageRecord], replay: bool = False) -> None:
        """Insert one batch; isolate rows PostgreSQL refuses by bisection.
        Raises _Unavailable when the database, not the data, failed."""
        started = self._reactor.seconds()
        self._op_starts.append(started)
        try:
            inserted = await self._store.insert(batch)
        except CancelledError:
            raise
        except _DATA_ERRORS as e:
            self._op_starts.remove(started)
            started = None
            if len(batch) == 1:
                self._reject(batch[0], e)
                return
            mid = len(batch) // 2
            try:
                await self._insert(batch[:mid], replay)
            except _Unavailable as u:  # the second half is unsettled too
                raise _Unavailable([*u.rows, *batch[mid:]]) from u.__cause__
            await self._insert(batch[mid:], replay)
            return
        except Exception as e:
            raise _Unavailable(batch) from e
        finally:
            if started is not None:
                self._op_starts.remove(started)
        self._m_flush.observe(self._reactor.seconds() - started)
        self._m_written.inc(inserted)
        if replay:
            self._m_replayed.inc(inserted)
        if inserted < len(batch):
            self._m_duplicates.inc(len(batch) - inserted)
        self._database_ok()

    def _reject(self, record: UsageRecord, error: BaseException) -> None:
        self._m_dropped.inc(1, "rejected")
        self._log.warn(
            "usage row {request_id} rejected by PostgreSQL and dropped: {reason}",
            request_id=str(record.request_id)[:64],
            reason=_reason(error),
        )

    def _database_ok(self) -> None:
        if not self._db_ok:
            self._db_ok = True
            self._replay_pending = True
            self._log.info("usage rows reach PostgreSQL again; replaying the spill journal")
        self._retry_delay = self._interval

    def _database_failed(self, error: BaseException) -> None:
        self._m_failures.inc()
        now = self._reactor.seconds()
        self._retry_at = now + self._retry_delay
        if self._db_ok:
            self._db_ok = False
            self._log.warn(
                "cannot write usage rows to PostgreSQL ({reason}); spilling them to {dir}",
                reason=_reason(error),
                dir=str(self.journal.directory),
            )
        self._retry_delay = min(self._retry_delay * 2, self._retry_max)

    def _clean(self, rows: Sequence[UsageRecord]) -> list[UsageRecord]:
        """Repaired and priced rows; malformed ones are dropped (and counted)
        here. A row that arrives without a price (the proxy did not price
        it, or it was replayed from an older journal) is priced now; an
        estimated prompt count becomes the row's prompt count."""
        cleaned = []
        pricing = self._pricing
        for r in rows:
            try:
                r = clean_record(r)
                if r.pricing is None and pricing is not None:
                    r = pricing.price_record(r)
                estimated = with_estimates(r)
                # (the estimated prompt count can take the total out of range)
                cleaned.append(r if estimated is r else _clean_fully(estimated))
            except Exception as e:
                self._m_dropped.inc(1, "invalid")
                self._log.warn("malformed usage row dropped: {reason}", reason=_reason(e))
        return cleaned

    # --- the journal ------------------------------------------------------------------

    def _spill_soon(self, rows: list[UsageRecord]) -> None:
        d = ensureDeferred(self._spill(rows))
        self._spills.add(d)

        def done(result: object) -> None:
            self._spills.discard(d)
            if isinstance(result, Failure):
                self._log.failure("usage spill failed unexpectedly", result)

        d.addBoth(done)

    async def _spill(self, rows: Sequence[UsageRecord], *, clean: bool = True) -> None:
        if clean:
            rows = self._clean(rows)
        if not rows:
            return
        try:
            result: AppendResult = await self._in_thread(self.journal.append, rows)
        except CancelledError:
            raise
        except Exception as e:
            self._log.failure("cannot write to the usage spill journal")
            self._drop(rows, "spill_error", e)
            return
        if result.written:
            self._m_spilled.inc(result.written)
            self._replay_pending = True
        if result.dropped:
            self._drop(rows[result.written :], "spill_full")

    def _drop(self, rows: Sequence[UsageRecord], reason: str, error=None) -> None:
        self._m_dropped.inc(len(rows), reason)
        if reason == "spill_full":
            self._log.warn(
                "usage spill journal is full ({budget} bytes, LECTR_SPILL_MAX_BYTES): "
                "dropped {n} usage rows",
                budget=self.journal.max_bytes,
                n=len(rows),
            )
        elif reason == "after_stop":
            self._log.warn("usage row recorded after the recorder stopped: dropped")
        else:
            self._log.warn(
                "dropped {n} usage rows ({reason})",
                n=len(rows),
                reason=_reason(error) if error else reason,
            )

    async def _replay_one(self) -> None:
        """Replay the oldest journal segment nobody else holds."""
        try:
            segment = await self._in_thread(self.journal.claim)
        except Exception:
            self._log.failure("cannot open the usage spill journal")
            self._replay_pending = False
            return
        if segment is None:
            self._replay_pending = False
            return
        try:
            records, bad = await self._in_thread(segment.read)
        except Exception:
            self._log.failure("unreadable usage spill segment {name}", name=segment.path.name)
            target = await self._in_thread(segment.set_aside)
            self._log.error("set aside as {name}", name=target.name)
            return
        if bad:
            self._m_dropped.inc(bad, "corrupt")
            self._log.warn(
                "{n} unreadable lines in usage spill segment {name} (torn write?)",
                n=bad,
                name=segment.path.name,
            )
        try:
            for batch in _chunks(self._clean(records), self._statement_rows):
                await self._insert(batch, replay=True)
        except BaseException as e:
            await self._in_thread(segment.release)
            if isinstance(e, _Unavailable):
                self._database_failed(e.__cause__ or e)
                return
            raise
        await self._in_thread(segment.delete)
        self._log.info(
            "replayed {n} usage rows from {name}", n=len(records), name=segment.path.name
        )

    # --- helpers ----------------------------------------------------------------------

    async def _wait(self, d: Deferred, timeout: float | None) -> bool:
        """Wait for ``d`` without cancelling it or consuming its result; True
        when it finished within ``timeout``."""
        waiter: Deferred[bool] = Deferred()

        def finished(result: object) -> object:
            if not waiter.called:
                waiter.callback(True)
            return result

        d.addBoth(finished)
        timer = None
        if timeout is not None and not waiter.called:
            timer = self._reactor.callLater(
                max(timeout, 0), lambda: waiter.called or waiter.callback(False)
            )
        result = await waiter
        if timer is not None and timer.active():
            timer.cancel()
        return result


def synchronous(fn: Callable[..., Any], *args: Any) -> Deferred:
    """A ``run_in_thread`` that runs in the caller's thread (tests with a
    fake clock)."""
    return maybeDeferred(fn, *args)
