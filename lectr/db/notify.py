"""Cache coherence across nodes: ``LISTEN lectr_changes`` on a dedicated
connection.

Writers queue ``Transaction.notify(kind, id)`` inside the transaction that
makes a change; PostgreSQL delivers ``'<kind>:<id>'`` to every listening node
when it commits. Subscribers register per kind and evict what they cached.

Notifications sent while this node is disconnected are lost, so after every
reconnect the listener calls the reset subscribers, which reload everything.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import psycopg2
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from lectr.config import redact_url
from lectr.db.database import (
    NOTIFY_CHANNEL,
    DatabaseUnavailable,
    _Connection,
    close_quietly,
    describe_error,
)
from lectr.metrics import Registry


class _ListenConnection(_Connection):
    on_lost: Callable[[], None] | None = None

    def connectionLost(self, reason):
        _Connection.connectionLost(self, reason)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()


def _lose(conn: _ListenConnection) -> None:
    """Close ``conn`` and make sure its loss is reported (once)."""
    close_quietly(conn)
    callback, conn.on_lost = conn.on_lost, None
    if callback is not None:
        callback()


class ChangeListener(Service):
    """Dispatches ``'<kind>:<id>'`` notifications to subscribers; reconnects
    with exponential backoff; pings the connection so a silently dead one is
    noticed within ``ping_interval + ping_timeout`` seconds."""

    _log = Logger()

    def __init__(
        self,
        dsn: str,
        *,
        reactor,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        metrics: Registry | None = None,
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._subscribers: dict[str, list[Callable[[str], Any]]] = defaultdict(list)
        self._reset_subscribers: list[Callable[[], Any]] = []
        self._conn: _ListenConnection | None = None
        self._reconnecting: Deferred | None = None
        self._stopping = False
        self._pinger = LoopingCall(self._ping_safely)
        self._pinger.clock = reactor
        self.connected = False
        registry = metrics or Registry()
        self._m_received = registry.counter(
            "lectr_notifications_received_total", "Change notifications received"
        )
        self._m_reconnects = registry.counter(
            "lectr_notify_reconnects_total", "Reconnections of the change listener"
        )

    # --- subscription --------------------------------------------------------

    def subscribe(self, kind: str, callback: Callable[[str], Any]) -> None:
        """Call ``callback(ident)`` for every ``'<kind>:<ident>'`` received."""
        self._subscribers[kind].append(callback)

    def on_reset(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after a reconnect: notifications may have been
        missed, so whatever was cached must be reloaded or dropped."""
        self._reset_subscribers.append(callback)

    # --- service -------------------------------------------------------------

    def startService(self) -> Deferred:
        Service.startService(self)
        self._stopping = False
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        await self._connect()
        self._pinger.start(self._ping_interval, now=False)
        self._log.info("listening for changes on {channel}", channel=NOTIFY_CHANNEL)

    def stopService(self) -> Deferred | None:
        Service.stopService(self)
        self._stopping = True
        if self._pinger.running:
            self._pinger.stop()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None:
            conn.on_lost = None
            if not conn.is_closed:
                conn.close()
        return None

    # --- connection ----------------------------------------------------------

    async def _connect(self) -> None:
        conn = _ListenConnection(reactor=self._reactor)
        timer = self._reactor.callLater(self._connect_timeout, close_quietly, conn)
        try:
            await conn.connect(self._dsn, application_name="lectr-listener")
            conn.addNotifyObserver(self._on_notify)
            await conn.runOperation(f"LISTEN {NOTIFY_CHANNEL}")
        except (psycopg2.Error, OSError, error.ConnectionDone, error.ConnectionLost) as e:
            close_quietly(conn)
            raise DatabaseUnavailable(
                f"change listener cannot connect to {redact_url(self._dsn)}: {describe_error(e)}"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        conn.on_lost = self._connection_lost
        self._conn = conn
        self.connected = True

    def _connection_lost(self) -> None:
        self.connected = False
        self._conn = None
        if self._stopping:
            return
        self._log.warn("change listener lost its connection; reconnecting")
        self._reconnecting = ensureDeferred(self._reconnect())
        self._reconnecting.addErrback(lambda f: f.trap(CancelledError))

    async def _reconnect(self) -> None:
        delay = self._min_backoff
        while not self._stopping:
            try:
                await self._connect()
            except DatabaseUnavailable as e:
                self._log.info(
                    "change listener: {reason}; retrying in {delay:.1f}s",
                    reason=str(e),
                    delay=delay,
                )
                await deferLater(self._reactor, delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._max_backoff)
                continue
            break
        self._reconnecting = None
        if self._stopping:
            return
        self._m_reconnects.inc()
        self._log.info("change listener reconnected; reloading caches")
        for callback in list(self._reset_subscribers):
            try:
                result = callback()
                if isinstance(result, Deferred):
                    result.addErrback(lambda f: self._log.failure("cache reset failed", f))
            except Exception:
                self._log.failure("cache reset failed")

    async def _ping(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.is_closed:  # died without the reactor noticing
            _lose(conn)
            return
        d = conn.runQuery("SELECT 1")
        timer = self._reactor.callLater(self._ping_timeout, close_quietly, conn)
        try:
            await d
        except (psycopg2.Error, error.ConnectionDone, error.ConnectionLost, CancelledError):
            # A connection that died under the ping (the backend was terminated,
            # the server restarted) is already closed, and then nothing else
            # reports it lost: report it here, or the listener would never
            # reconnect and the caches would stay stale for ever.
            _lose(conn)
        finally:
            if timer.active():
                timer.cancel()

    def _ping_safely(self) -> Deferred:
        # The LoopingCall must survive anything: log and carry on.
        d = ensureDeferred(self._ping())
        d.addErrback(lambda f: self._log.failure("change listener ping failed", f))
        return d

    # --- dispatch ------------------------------------------------------------

    def _on_notify(self, notify) -> None:
        if notify.channel != NOTIFY_CHANNEL:
            return
        self._m_received.inc()
        self.dispatch(notify.payload)

    def dispatch(self, payload: str) -> None:
        """Deliver one payload to the subscribers of its kind."""
        kind, sep, ident = payload.partition(":")
        if not sep or not ident:
            self._log.warn("ignoring malformed change notification")
            return
        for callback in list(self._subscribers.get(kind, ())):
            try:
                callback(ident)
            except Exception:
                self._log.failure("change subscriber for {kind} failed", kind=kind)
