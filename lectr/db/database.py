"""A small facade over txpostgres: a growable connection pool, transactions
with a description, ``async def`` interactions, and recovery from dead
connections.

Usage (in a datastore)::

    rows = await db.runQuery("get_org", "SELECT ... WHERE id = %s", (org_id,))

    async def txn(t: Transaction) -> Org:
        row = await t.fetchone("UPDATE ... RETURNING ...", (name, org_id))
        t.notify("org", org_id)          # delivered on COMMIT, in the same transaction
        return Org(*row)
    org = await db.runInteraction("rename_org", txn)

Every operation carries a short description (``desc``) used in log lines and
in the ``lectr_db_transaction_seconds`` metric. Cancelling an operation never
interrupts a round trip halfway: the work finishes (a transaction rolls back
instead of committing) and then the caller sees ``CancelledError``.

txpostgres calls an interaction with a cursor and does not await coroutines,
so this module runs interactions itself on a checked-out connection.
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from twisted.internet import error, main
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from txpostgres import txpostgres

from lectr import tracing
from lectr.config import redact_url
from lectr.metrics import Registry
from lectr.util.deferred import CancellationFlag, delay_cancellation

T = TypeVar("T")

NOTIFY_CHANNEL = "lectr_changes"
_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


#: Lectr's statements are short look-ups and sums over rollups, where
#: PostgreSQL's JIT (on by default, for any plan over ``jit_above_cost``) only
#: adds its compile time: 40-55 ms to a month's per-org totals on a large
#: request log (docs/performance.md, "Admin queries at scale"). Set once per
#: connection, after it opens - not as the ``options`` startup parameter,
#: which PgBouncer refuses unless configured to ("unsupported startup
#: parameter: options") and which would make libpq ignore ``PGOPTIONS``.
_JIT_OFF = "SET jit = off"
#: options that set jit themselves (``-c jit=on``, ``-cjit=on``, ``--jit=on``),
#: from the DSN, ``PGOPTIONS`` or a service file: theirs wins
_SETS_JIT = re.compile(r"(?:-c\s*|--)jit=", re.IGNORECASE)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (connection refused, lost, timed out)."""


class DatabaseClosed(DatabaseUnavailable):
    """The pool has been closed (Lectr is shutting down)."""


class _Connection(txpostgres.Connection):
    """A txpostgres connection that reports a connection lost while idle (the
    server restarted, or an admin terminated the backend) as a quiet
    disconnect instead of an exception logged by the reactor."""

    def doRead(self):
        try:
            txpostgres.Connection.doRead(self)
        except psycopg2.Error:
            return main.CONNECTION_LOST
        except ValueError:
            # the socket died under txpostgres's feet (connection cut while
            # polling): it re-registers fd -1 with the reactor
            if self.is_closed or self.fileno() < 0:
                return main.CONNECTION_LOST
            raise
        return None

    @property
    def is_closed(self) -> bool:
        raw = self._connection
        return raw is None or bool(raw.closed)

    def _cancel(self, d: Deferred) -> None:
        """Cancelling the connection attempt (a stop during start-up, or while
        the change listener reconnects) closes the connection, and the attempt
        fails with CancelledError. txpostgres's canceller asks libpq to cancel
        instead, which raises "asynchronous connection attempt underway" on a
        connection being opened: the stop became that error (an "unexpected
        error during start-up") and the attempt ran on, its socket open.
        (Only a connect's Deferred is cancelled here: queries run on cursors,
        and the pool never cancels one, see delay_cancellation.)"""
        if self._pollingD is d:
            self._pollingD = None  # closing must not fail it: cancel() does
        close_quietly(self)


class Transaction:
    """What an interaction receives: run statements, queue notifications."""

    __slots__ = ("desc", "_cursor", "_notifies", "_after_commit")

    def __init__(self, desc: str, cursor: txpostgres.Cursor) -> None:
        self.desc = desc
        self._cursor = cursor
        self._notifies: dict[str, None] = {}
        self._after_commit: list[Callable[[], Any]] = []

    async def execute(self, sql: str, args: Any = None) -> int:
        """Run a statement; return the number of rows it affected."""
        cursor = await self._cursor.execute(sql, args)
        return cursor.rowcount

    async def fetchall(self, sql: str, args: Any = None) -> list[tuple]:
        cursor = await self._cursor.execute(sql, args)
        return cursor.fetchall() if cursor.description is not None else []

    async def fetchone(self, sql: str, args: Any = None) -> tuple | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    def notify(self, kind: str, ident: str) -> None:
        """Queue ``NOTIFY lectr_changes, '<kind>:<ident>'``. Payloads carry
        ids only, never secrets. Sent just before COMMIT, so listeners hear
        of the change exactly when it becomes visible (and never if it rolls
        back)."""
        if ":" in kind or not ident or len(ident) > 200:
            raise ValueError(f"bad notification {kind!r}")
        self._notifies[f"{kind}:{ident}"] = None

    def call_after_commit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once the transaction has committed (e.g. a local cache
        eviction that must not precede the commit)."""
        self._after_commit.append(fn)

    async def _send_notifies(self) -> None:
        for payload in self._notifies:
            await self._cursor.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))


class Database:
    """A pool of txpostgres connections, opened at start (``min_size``) and
    grown on demand up to ``max_size``. Connections found dead are replaced;
    an operation that failed only because its connection had died before it
    was sent is retried once on a fresh connection."""

    _log = Logger()

    def __init__(
        self,
        dsn: str,
        *,
        reactor: IReactorTime & IReactorCore,
        min_size: int = 2,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        slow_threshold: float = 1.0,
        metrics: Registry | None = None,
        application_name: str = "lectr",
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        self.dsn = dsn
        self.safe_dsn = redact_url(dsn)
        self._reactor = reactor
        self._min = min_size
        self._max = max_size
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._slow = slow_threshold
        self._connect_kwargs = {
            "application_name": application_name,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        self._idle: list[tuple[_Connection, float]] = []
        self._size = 0  # connections open or being opened
        self._busy = 0
        self._waiters: deque[Deferred[_Connection | None]] = deque()
        self._closed = False
        self._drained: Deferred[None] | None = None
        self._reaper = LoopingCall(self._reap_idle)
        self._reaper.clock = reactor
        registry = metrics or Registry()
        self._m_txn = registry.histogram(
            "lectr_db_transaction_seconds", "Database operations by description", ["desc"]
        )
        self._m_errors = registry.counter(
            "lectr_db_errors_total", "Failed database operations by description", ["desc"]
        )
        registry.callback_gauge(
            "lectr_db_pool_connections",
            "Open PostgreSQL connections in the pool",
            lambda: self._size,
        )

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open ``min_size`` connections. Fails with DatabaseUnavailable."""
        results = await DeferredList(
            [Deferred.fromCoroutine(self._open()) for _ in range(self._min)],
            consumeErrors=True,
        )
        failures = [r for ok, r in results if not ok]
        for ok, conn in results:
            if ok:
                self._idle.append((conn, self._reactor.seconds()))
        if failures:
            self._close_idle()
            failures[0].raiseException()
        self._reaper.start(max(self._idle_timeout / 2, 1.0), now=False).addErrback(
            lambda f: self._log.failure("pool reaper stopped", f)
        )
        self._log.info(
            "database pool open: {dsn} ({n} connections, at most {max})",
            dsn=self.safe_dsn,
            n=self._size,
            max=self._max,
        )

    async def close(self, timeout: float = 10.0) -> None:
        """Refuse new work, wait (up to ``timeout``) for in-flight operations,
        then close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._reaper.running:
            self._reaper.stop()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.called:
                w.errback(DatabaseClosed("the database pool is closed"))
        if self._busy:
            self._drained = Deferred()
            timer = self._reactor.callLater(timeout, self._drained.callback, None)
            await self._drained
            if timer.active():
                timer.cancel()
        self._close_idle()

    def _close_idle(self) -> None:
        while self._idle:
            conn, _ = self._idle.pop()
            self._discard(conn)

    # --- public operations ---------------------------------------------------

    def runQuery(self, desc: str, sql: str, args: Any = None) -> Deferred[list[tuple]]:
        """Run one statement in autocommit mode and return its rows. Retried
        once on a connection that turns out to be dead, so use it for reads
        and idempotent statements; write through :meth:`runInteraction`."""

        async def run(flag: CancellationFlag) -> list[tuple]:
            return await self._run(desc, flag, self._query, sql, args, retry=True)

        return delay_cancellation(run)

    def pause(self) -> Deferred[None]:
        """Fires on a later turn of the reactor: for work that prepares a
        large statement in slices, so that requests are served in between."""
        return deferLater(self._reactor, 0, lambda: None)

    def runInteraction(
        self,
        desc: str,
        interaction: Callable[..., Awaitable[T] | T],
        *args: Any,
        **kwargs: Any,
    ) -> Deferred[T]:
        """Run ``interaction(txn, *args, **kwargs)`` in a transaction. It may
        be an ``async def``, return a Deferred, or return a value. An
        exception rolls back; so does cancellation by the caller."""

        async def run(flag: CancellationFlag) -> T:
            return await self._run(
                desc, flag, self._transaction, interaction, args, kwargs, retry=True
            )

        return delay_cancellation(run)

    def ping(self) -> Deferred[list[tuple]]:
        return self.runQuery("ping", "SELECT 1")

    # --- machinery -----------------------------------------------------------

    async def _run(self, desc: str, flag: CancellationFlag, body, *args, retry: bool) -> Any:
        started = self._reactor.seconds()
        trace = tracing.current()  # a traced admin call: this becomes a child span
        trace_started = trace.now() if trace is not None else 0.0
        error: str | None = None
        try:
            for attempt in (1, 2):
                conn = await self._acquire()
                try:
                    return await body(conn, desc, flag, *args)
                except _StaleConnection as stale:
                    if attempt == 2 or not retry:
                        raise DatabaseUnavailable(f"{desc}: connection lost") from stale.__cause__
                    self._log.info("{desc}: connection was dead, retrying on a new one", desc=desc)
                except _CONNECTION_ERRORS as e:
                    if conn.is_closed:
                        raise DatabaseUnavailable(f"{desc}: connection lost") from e
                    raise
                finally:
                    self._release(conn)
            raise AssertionError("unreachable")
        except BaseException as e:
            error = type(e).__name__
            if not isinstance(e, CancelledError):
                self._m_errors.inc(1, desc)
            raise
        finally:
            elapsed = self._reactor.seconds() - started
            self._m_txn.observe(elapsed, desc)
            if trace is not None:
                trace.child(desc, trace_started, trace.now(), error)
            if elapsed > self._slow:
                self._log.warn(
                    "slow database operation {desc}: {ms:.0f} ms", desc=desc, ms=elapsed * 1000
                )

    async def _query(self, conn: _Connection, desc: str, flag, sql: str, args: Any) -> list[tuple]:
        try:
            cursor = await conn.cursor().execute(sql, args)
        except _CONNECTION_ERRORS as e:
            if conn.is_closed:
                raise _StaleConnection() from e
            raise
        return cursor.fetchall() if cursor.description is not None else []

    async def _transaction(
        self, conn: _Connection, desc: str, flag: CancellationFlag, interaction, args, kwargs
    ) -> Any:
        cursor = conn.cursor()
        try:
            await cursor.execute("BEGIN")
        except _CONNECTION_ERRORS as e:
            if conn.is_closed:
                raise _StaleConnection() from e  # nothing was sent: safe to retry
            raise
        txn = Transaction(desc, cursor)
        try:
            result = interaction(txn, *args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            if flag.cancelled:
                raise CancelledError()
            await txn._send_notifies()
            await cursor.execute("COMMIT")
        except BaseException:
            await self._rollback(conn, cursor, desc)
            raise
        for fn in txn._after_commit:
            try:
                fn()
            except Exception:
                self._log.failure("{desc}: after-commit callback failed", desc=desc)
        return result

    async def _rollback(self, conn: _Connection, cursor, desc: str) -> None:
        if conn.is_closed:
            return
        try:
            await cursor.execute("ROLLBACK")
        except psycopg2.Error:
            # A connection that cannot roll back is not reused.
            self._log.warn("{desc}: rollback failed; dropping the connection", desc=desc)
            conn.close()

    async def _open(self) -> _Connection:
        self._size += 1
        try:
            conn = _Connection(reactor=self._reactor)
            d = conn.connect(self.dsn, **self._connect_kwargs)
            timer = self._reactor.callLater(self._connect_timeout, close_quietly, conn)
            try:
                await d
                # (the options libpq sent, wherever they came from)
                if _SETS_JIT.search(conn._connection.info.options or "") is None:
                    await conn.runOperation(_JIT_OFF)
            except BaseException:
                close_quietly(conn)
                raise
            finally:
                if timer.active():
                    timer.cancel()
            return conn
        except (psycopg2.Error, OSError, error.ConnectionDone, error.ConnectionLost) as e:
            self._slot_freed()
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {self.safe_dsn}: {describe_error(e)}"
            ) from None
        except BaseException:
            self._slot_freed()
            raise

    def _slot_freed(self) -> None:
        """A connection that was being opened failed: its slot is free, so a
        waiter queued behind it must go round and try for itself (else it
        waits until some other operation succeeds, for a whole outage)."""
        self._size -= 1
        self._wake(None)

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise DatabaseClosed("the database pool is closed")
            while self._idle:
                conn, _ = self._idle.pop()
                if conn.is_closed:
                    self._discard(conn)
                    continue
                self._busy += 1
                return conn
            if self._size < self._max:
                conn = await self._open()
                self._busy += 1
                return conn
            waiter: Deferred[_Connection | None] = Deferred(self._waiters.remove)
            self._waiters.append(waiter)
            conn = await waiter
            if conn is not None:
                self._busy += 1
                return conn
            # None: a slot was freed by a discarded connection; go round again

    def _release(self, conn: _Connection) -> None:
        self._busy -= 1
        if self._closed or conn.is_closed:
            self._discard(conn)
            self._wake(None)
        else:
            self._wake(conn) or self._idle.append((conn, self._reactor.seconds()))
        if self._drained is not None and self._busy == 0 and not self._drained.called:
            self._drained.callback(None)

    def _wake(self, conn: _Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(conn)
                return True
        return False

    def _discard(self, conn: _Connection) -> None:
        self._size -= 1
        try:
            conn.close()
        except psycopg2.Error:
            pass

    def _reap_idle(self) -> None:
        """Close connections idle for longer than ``idle_timeout`` while
        more than ``min_size`` are open."""
        now = self._reactor.seconds()
        keep = []
        # oldest first: the list is a stack, the bottom has waited longest
        for conn, since in self._idle:
            if self._size > self._min and (conn.is_closed or now - since > self._idle_timeout):
                self._discard(conn)
            elif conn.is_closed:
                self._discard(conn)
            else:
                keep.append((conn, since))
        self._idle = keep


class _StaleConnection(Exception):
    """The connection was dead before the operation reached the server."""


def close_quietly(conn: _Connection) -> None:
    """Close a connection that may be half-open or already gone."""
    try:
        if not conn.is_closed:
            conn.close()
    except (psycopg2.Error, AttributeError):
        pass


def describe_error(e: BaseException) -> str:
    """One line for an operator: the first line of a (libpq) error."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    # libpq messages are multi-line; the first line carries the reason
    first = text.splitlines()[0]
    return first.removeprefix("connection to server ").strip()
