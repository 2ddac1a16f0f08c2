"""A lean keep-alive HTTP/1.1 client for upstream providers, parsing with llhttp.

Why not twisted.web.client.Agent: per request it builds Deferreds, a Headers
object, a response object, a body protocol and a pool key; its pure-Python
chunked decoder and line parser are a large share of a stream relay's CPU
(bench/profiles/). This client writes a request in one call and hands the
response to a *sink* as it arrives:

- ``sink.response_started(status, reason, headers, length)`` once (interim
  1xx answers are skipped; ``length`` is the Content-Length, None when
  chunked or close-delimited);
- ``sink.response_data(data)`` per read from the socket, chunked framing
  removed, never decompressed (the body pieces of one read are joined);
- ``sink.response_done()`` once at the clean end;
- ``sink.response_failed(error)`` once, before or after
  ``response_started``, never after ``response_done``: an
  :class:`UpstreamError` whose ``kind`` is ``connect``, ``connect_timeout``,
  ``dns``, ``tls``, ``closed`` (the connection ended before a complete
  response head), ``protocol`` (an invalid response), ``dropped`` (the
  connection ended mid-body) or ``internal`` (a sink method raised).

No sink method is called from within :meth:`UpstreamClient.request` itself,
nor after :meth:`UpstreamHandle.cancel`. An exception raised by a sink method
is logged, the connection dropped, and ``response_failed`` called once with
kind ``internal`` (so the request in hand can still end).

Connections are pooled per origin (LIFO: the most recently used first, so
the least used age out), at most ``max_idle_per_origin`` idle ones, each
closed after ``idle_timeout`` seconds unused; one the server closes while
idle is dropped at once, one that receives bytes while idle is closed; one
whose response came while part of its request was still queued (the body not
read) is aborted, never pooled.

The keep-alive race: a request sent on a reused connection that the server
closes before sending any response byte (it had just decided to close it) is
retried once on a new connection, **only when that is safe**, by Go
net/http's rule: the method is GET, HEAD, OPTIONS or TRACE, or the request
carries an ``Idempotency-Key`` / ``X-Idempotency-Key`` header. A POST
without one is never retried here (the server may have acted on it): it
fails with ``closed`` and the caller's attempt loop decides. Nothing else is
ever retried.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpResponseParser
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.http.headers import HeaderList
from lectr.http.tcp import direct_reads, no_delay, send, unsent

#: bytes of a response's head (its 1xx heads included) before it is refused:
#: llhttp sets no bound, and a header value arriving in pieces is joined
#: piece by piece (time quadratic in its size) - providers send a few KiB;
#: a chunked response's trailer section is bounded alike
MAX_RESPONSE_HEAD = 256 * 1024
_SAFE_TO_RETRY = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
_LENGTH_ALWAYS = frozenset({b"POST", b"PUT", b"PATCH"})
_TARGET = re.compile(rb"[\x21-\x7e]*")


class UpstreamError(Exception):
    """Why an upstream exchange failed. ``started``: the response head had
    been handed to the sink."""

    def __init__(self, kind: str, detail: str, started: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.started = started


class Origin:
    """Scheme, host and port of a provider's base URL, parsed once."""

    __slots__ = ("scheme", "host", "port", "path_prefix", "host_header", "key")

    def __init__(self, scheme: str, host: str, port: int, path_prefix: bytes) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path_prefix = path_prefix
        hostname = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        self.host_header = (hostname if port == default else f"{hostname}:{port}").encode("idna")
        self.key = (scheme, host, port)

    @classmethod
    def from_url(cls, url: str) -> Origin:
        """``https://api.openai.com/prefix`` → the origin and ``b"/prefix"``
        (prepended to every request target; no trailing slash)."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("a base URL has no query, fragment or credentials")
        host = parts.hostname
        if ":" not in host:
            host = host.encode("idna").decode("ascii")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        prefix = parts.path.rstrip("/").encode("ascii")
        return cls(parts.scheme, host, port, prefix)

    def __repr__(self) -> str:
        return f"Origin({self.scheme}://{self.host_header.decode()}{self.path_prefix.decode()})"


class UpstreamClient:
    """Keep-alive connections to upstream origins (see the module docstring)."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        *,
        connect_timeout: float,
        max_idle_per_origin: int = 512,
        idle_timeout: float = 20,
        tls_policy=None,
        metrics=None,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self._tls_policy = tls_policy
        self._idle: dict[tuple, list[_UpstreamProtocol]] = {}
        self._endpoints: dict[tuple, object] = {}
        self._sweeper = None
        #: counters (also exported when ``metrics`` is given): connections
        #: opened, exchanges retried on a new connection
        self.connections_opened = 0
        self.retries = 0
        self._m_opened = self._m_retries = None
        if metrics is not None:
            self._m_opened = metrics.counter(
                "lectr_upstream_connections_opened_total",
                "Connections opened to providers (the rest of the requests reuse one)",
            )
            self._m_retries = metrics.counter(
                "lectr_upstream_stale_retries_total",
                "Requests resent on a new connection because a reused one was closed "
                "by the provider before any answer",
            )
            metrics.callback_gauge(
                "lectr_upstream_idle_connections",
                "Idle keep-alive connections to providers",
                lambda: sum(len(v) for v in self._idle.values()),
            )

    # --- requests ------------------------------------------------------------------------

    def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        sink,
    ) -> UpstreamHandle:
        """Send ``method origin.path_prefix+target`` with ``headers`` (as
        given), ``Host`` unless present, ``Content-Length`` for a body (always
        for POST/PUT/PATCH). Raises ValueError, before anything is sent, for
        a target or header that would break the request's framing."""
        path = origin.path_prefix + target
        if not path.startswith(b"/") or not _TARGET.fullmatch(path):
            raise ValueError("invalid request target")
        lines = [method, b" ", path, b" HTTP/1.1\r\n"]
        has_host = False
        retry_ok = method in _SAFE_TO_RETRY
        for name, value in headers:
            lname = name.lower()
            if lname == b"host":
                has_host = True
            elif lname == b"idempotency-key" or lname == b"x-idempotency-key":
                retry_ok = True
            lines.append(name + b": " + value + b"\r\n")
        if not has_host:
            lines.append(b"Host: " + origin.host_header + b"\r\n")
        if body or method in _LENGTH_ALWAYS:
            lines.append(b"Content-Length: %d\r\n" % len(body or b""))
        lines.append(b"\r\n")
        head = b"".join(lines)
        n = len(lines) - 3  # the request line is 4 pieces, every other piece 1 line
        if head.count(b"\n") != n or head.count(b"\r") != n or b"\0" in head:
            raise ValueError("CR, LF or NUL in a request header name or value")
        handle = UpstreamHandle(self, origin, (head, body) if body else (head,), sink)
        handle._head_only = method == b"HEAD"
        handle._retry_ok = retry_ok
        handle._in_request = True
        try:
            conn = self._take(origin.key)
            if conn is not None:
                handle._reused = True
                conn.send(handle)
            else:
                self._connect(handle)
        finally:
            handle._in_request = False
        return handle

    def _connect(self, handle: UpstreamHandle) -> None:
        origin = handle._origin
        try:
            endpoint = self._endpoint(origin)
        except Exception as e:
            handle._fail(UpstreamError("tls" if origin.scheme == "https" else "connect", str(e)))
            return
        self.connections_opened += 1
        if self._m_opened is not None:
            self._m_opened.inc()
        d = endpoint.connect(_ConnFactory(self, origin.key))
        handle._connecting = d
        d.addCallbacks(handle._connected, handle._connect_failed)

    def _endpoint(self, origin: Origin):
        endpoint = self._endpoints.get(origin.key)
        if endpoint is None:
            endpoint = HostnameEndpoint(
                self.reactor, origin.host, origin.port, timeout=self.connect_timeout
            )
            if origin.scheme == "https":
                policy = self._tls_policy
                if policy is None:
                    from twisted.web.client import BrowserLikePolicyForHTTPS

                    policy = self._tls_policy = BrowserLikePolicyForHTTPS()
                creator = policy.creatorForNetloc(origin.host.encode("idna"), origin.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[origin.key] = endpoint
        return endpoint

    # --- the pool ----------------------------------------------------------------------------

    def _take(self, key) -> _UpstreamProtocol | None:
        pool = self._idle.get(key)
        if not pool:
            return None
        # idle past idle_timeout: closed, not reused (the sweep runs every quarter of it)
        expired = self.reactor.seconds() - self.idle_timeout
        while pool:
            conn = pool.pop()
            if conn._lost or conn._broken:
                continue
            conn._pooled = False
            if conn._idle_since <= expired:
                conn.transport.loseConnection()
                continue
            return conn
        return None

    def _release(self, conn: _UpstreamProtocol) -> None:
        pool = self._idle.get(conn._key)
        if pool is None:
            pool = self._idle[conn._key] = []
        if len(pool) >= self.max_idle_per_origin:
            conn.transport.loseConnection()
            return
        conn._idle_since = self.reactor.seconds()
        conn._pooled = True
        pool.append(conn)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self._sweep_every(), self._sweep)

    def _forget(self, conn: _UpstreamProtocol) -> None:
        """An idle connection went away."""
        conn._pooled = False
        pool = self._idle.get(conn._key)
        if pool:
            try:
                pool.remove(conn)
            except ValueError:
                pass

    def _sweep_every(self) -> float:
        return max(self.idle_timeout / 4, 0.05)

    def _sweep(self) -> None:
        self._sweeper = None
        try:
            cutoff = self.reactor.seconds() - self.idle_timeout
            left = False
            for pool in self._idle.values():
                # LIFO: the oldest idle connections are at the front
                while pool and pool[0]._idle_since <= cutoff:
                    conn = pool.pop(0)
                    conn._pooled = False
                    conn.transport.loseConnection()
                left = left or bool(pool)
        except Exception:
            self._log.failure("sweeping idle upstream connections failed")
            left = True
        if left:
            self._sweeper = self.reactor.callLater(self._sweep_every(), self._sweep)

    def idle_count(self, origin: Origin | None = None) -> int:
        if origin is not None:
            return len(self._idle.get(origin.key, ()))
        return sum(map(len, self._idle.values()))

    def close_idle(self) -> Deferred:
        """Close every idle connection; fires once they are closed."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()
        waits = []
        for pool in self._idle.values():
            while pool:
                conn = pool.pop()
                conn._pooled = False
                if not conn._lost:
                    d = Deferred()
                    conn._on_close = d
                    waits.append(d)
                    conn.transport.loseConnection()
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)


class UpstreamHandle:
    """One exchange: flow control and cancellation. Also an IPushProducer
    (``pauseProducing``/``resumeProducing``/``stopProducing``), so it can be
    given to ``ServerRequest.set_producer`` for backpressure."""

    __slots__ = (
        "_client",
        "_origin",
        "_data",
        "_sink",
        "_conn",
        "_connecting",
        "_paused",
        "_done",
        "_started",
        "_reused",
        "_retry_ok",
        "_head_only",
        "_in_request",
    )

    def __init__(self, client: UpstreamClient, origin: Origin, data: tuple, sink) -> None:
        self._client = client
        self._origin = origin
        self._data = data
        self._sink = sink
        self._conn: _UpstreamProtocol | None = None
        self._connecting: Deferred | None = None
        self._paused = False
        self._done = False
        self._started = False
        self._reused = False
        self._retry_ok = False
        self._head_only = False
        self._in_request = False

    # --- flow control ------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether the caller has paused reading (backpressure)."""
        return self._paused

    def pause(self) -> None:
        """Stop reading the upstream socket."""
        if self._done or self._paused:
            return
        self._paused = True
        conn = self._conn
        if conn is not None:
            conn.transport.pauseProducing()

    def resume(self) -> None:
        if self._done or not self._paused:
            return
        self._paused = False
        conn = self._conn
        if conn is not None:
            conn.transport.resumeProducing()

    def cancel(self) -> None:
        """Abort the exchange: the connection is closed (never reused) and
        the sink hears nothing more."""
        if self._done:
            return
        self._done = True
        self._data = ()
        d, self._connecting = self._connecting, None
        if d is not None:
            d.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._handle = None
            conn._broken = True
            conn.transport.abortConnection()

    pauseProducing = pause
    resumeProducing = resume
    stopProducing = cancel

    @property
    def done(self) -> bool:
        return self._done

    # --- connecting --------------------------------------------------------------------------

    def _connected(self, conn: _UpstreamProtocol) -> None:
        self._connecting = None
        if self._done:
            self._client._release(conn)  # a fresh connection, unused: keep it
            return
        conn.send(self)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._done:
            return
        if failure.check(net_error.DNSLookupError):
            kind = "dns"
        elif failure.check(net_error.TimeoutError, CancelledError):
            kind = "connect_timeout"
        else:
            kind = "connect"
        self._fail(UpstreamError(kind, failure.getErrorMessage()))

    def _fail(self, error: UpstreamError) -> None:
        if self._done:
            return
        if self._in_request:
            # never call the sink before request() has returned the handle
            self._client.reactor.callLater(0, self._fail, error)
            return
        self._done = True
        self._data = ()
        self._conn = None
        try:
            self._sink.response_failed(error)
        except Exception:
            self._client._log.failure("upstream sink failed")


class _ConnFactory(Factory):
    noisy = False

    def __init__(self, client: UpstreamClient, key: tuple) -> None:
        self.client = client
        self.key = key

    def buildProtocol(self, addr):
        return _UpstreamProtocol(self.client, self.key)


class _UpstreamProtocol(Protocol):
    """One upstream connection; serves one exchange at a time."""

    __slots__ = (
        "transport",
        "connected",
        "_client",
        "_key",
        "_parser",
        "_dirty",
        "_handle",
        "_reason",
        "_raw",
        "_pending",
        "_got_bytes",
        "_interim",
        "_head_done",
        "_msg_done",
        "_keep",
        "_close_delimited",
        "_broken",
        "_lost",
        "_pooled",
        "_idle_since",
        "_on_close",
        "_head_bytes",
        "_framing",
    )

    def __init__(self, client: UpstreamClient, key: tuple) -> None:
        self.transport = None
        self.connected = 0
        self._client = client
        self._key = key
        self._parser = HttpResponseParser(self)
        self._dirty = False
        self._handle: UpstreamHandle | None = None
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._pending: list[bytes] = []
        self._got_bytes = False
        self._interim = False
        self._head_done = False
        self._msg_done = False
        self._keep = False
        self._close_delimited = False
        self._broken = False
        self._lost = False
        self._pooled = False
        self._idle_since = 0.0
        self._on_close: Deferred | None = None
        self._head_bytes = 0
        self._framing = 0  # bytes of the reads since the body's last data (chunk framing, trailers)

    def connectionMade(self) -> None:
        no_delay(self.transport)
        direct_reads(self)

    def send(self, handle: UpstreamHandle) -> None:
        if self._dirty:
            self._parser = HttpResponseParser(self)
            self._dirty = False
        self._handle = handle
        handle._conn = self
        self._reason = b""
        self._raw = []
        self._got_bytes = False
        self._interim = False
        self._head_done = False
        self._msg_done = False
        self._close_delimited = False
        self._head_bytes = 0
        self._framing = 0
        send(self.transport, handle._data)
        if handle._paused:
            self.transport.pauseProducing()

    # --- receiving ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        h = self._handle
        if h is None:
            # bytes on an idle connection: the server is confused; never reuse
            self._broken = True
            if self._pooled:
                self._client._forget(self)
            self.transport.abortConnection()
            return
        self._got_bytes = True
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD:
                self._protocol_error(h, "response head too large")
                return
        in_body = self._head_done
        try:
            self._parser.feed_data(data)
        except HttpParserError as e:
            cause = e.__context__
            if cause is not None and not isinstance(cause, _Invalid):
                self._sink_failed(h, cause)
                return
            if not self._msg_done:
                self._protocol_error(h, str(cause or e))
                return
            self._broken = True  # bytes after a complete response: end it, drop the connection
        if h._done:
            return
        pending = self._pending
        if in_body and not self._msg_done:
            if pending:
                self._framing = 0
            else:
                # a read of the body with no body data: chunk framing, or the
                # last chunk's trailer section, which llhttp joins field by
                # field read by read (a copy of all of it per read, without
                # end: 256 MiB held the reactor 7 min in all, 0.4 s per read
                # at the end); the trailers are dropped, bounded as the head
                # is (counted per read: no callback per chunk)
                self._framing += len(data)
                if self._framing > MAX_RESPONSE_HEAD:
                    self._protocol_error(h, "response trailers too large")
                    return
        if pending:
            out = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            try:
                h._sink.response_data(out)
            except Exception as e:
                self._sink_failed(h, e)
                return
        if self._msg_done and not h._done:
            self._complete(h)

    def on_message_begin(self) -> None:
        if self._msg_done:
            self._broken = True  # more than one response to one request
            raise _Invalid("unexpected bytes after the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # chunked trailers: dropped
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        h = self._handle
        status = self._parser.get_status_code()
        if status < 100:  # (llhttp takes any three digits)
            raise _Invalid(f"invalid status code {status:03d}")
        if status < 200:
            if status == 101:
                raise _Invalid("unexpected 101 Switching Protocols")
            self._interim = True  # 1xx: skipped
            self._raw = []
            self._reason = b""
            return
        self._head_done = True
        headers = HeaderList(self._raw)
        length = None
        if b"transfer-encoding" in headers:
            te = headers.get(b"transfer-encoding")
            if len(te) != 1 or te[0].lower() != b"chunked":
                raise _Invalid("unsupported Transfer-Encoding")
        else:
            cl = headers.first(b"content-length")
            if cl is not None:
                length = int(cl)  # llhttp checked it: digits, one field
            elif not (h._head_only or status == 204 or status == 304):
                self._close_delimited = True
        h._started = True
        h._data = ()  # nothing will be re-sent now
        if h._head_only:
            self._msg_done = True
            self._keep = self._parser.should_keep_alive()
            self._dirty = True  # llhttp would wait for the announced body
        if not h._done:
            try:
                h._sink.response_started(status, self._reason, headers, length)
            except Exception as e:
                self._sink_failed(h, e)

    def on_body(self, data: bytes) -> None:
        if self._interim or self._dirty:
            return
        self._pending.append(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._msg_done = True
        # (only valid here: llhttp resets it once the message is done)
        self._keep = self._parser.should_keep_alive()

    # --- endings -------------------------------------------------------------------------------

    def _complete(self, h: UpstreamHandle) -> None:
        keep = not self._broken and not self._close_delimited and self._keep
        self._handle = None
        h._conn = None
        h._done = True
        if h._paused:
            self.transport.resumeProducing()
        if unsent(self.transport):
            # answered before the request was all sent (its body not read):
            # never reused, nor kept open to send the rest
            self.transport.abortConnection()
        elif keep and not self._lost:
            self._client._release(self)
        else:
            self.transport.loseConnection()
        try:
            h._sink.response_done()
        except Exception:
            self._client._log.failure("upstream sink failed")

    def _protocol_error(self, h: UpstreamHandle, detail: str) -> None:
        self._broken = True
        self._handle = None
        self.transport.abortConnection()
        h._fail(UpstreamError("protocol", detail, h._started))

    def _sink_failed(self, h: UpstreamHandle, exc: BaseException) -> None:
        """A sink method raised: log it, drop the connection, and tell the
        sink once (kind ``internal``) so its request can still end."""
        self._client._log.failure("upstream sink failed", Failure(exc))
        self._broken = True
        self._handle = None
        h._conn = None
        self.transport.abortConnection()
        h._fail(UpstreamError("internal", f"the sink raised {type(exc).__name__}", h._started))

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self.connected = 0
        if self._pooled:
            self._client._forget(self)
        d, self._on_close = self._on_close, None
        if d is not None:
            d.callback(None)
        h, self._handle = self._handle, None
        if h is None or h._done:
            return
        h._conn = None
        clean = reason is None or reason.check(net_error.ConnectionDone)
        if self._close_delimited and self._head_done:
            if clean:
                h._done = True
                try:
                    h._sink.response_done()
                except Exception:
                    self._client._log.failure("upstream sink failed")
            else:
                h._fail(UpstreamError("dropped", _reason_text(reason), True))
            return
        if _is_tls_error(reason):
            h._fail(UpstreamError("tls", _reason_text(reason), h._started))
            return
        if h._started:
            h._fail(UpstreamError("dropped", _reason_text(reason), True))
            return
        if (
            not self._got_bytes
            and h._reused
            and h._retry_ok
            and reason is not None
            and reason.check(net_error.ConnectionDone, net_error.ConnectionLost)
        ):
            h._reused = False  # the retry is on a new connection, and the only one
            client = self._client
            client.retries += 1
            if client._m_retries is not None:
                client._m_retries.inc()
            self._client._connect(h)
            return
        h._fail(UpstreamError("closed", _reason_text(reason)))


class _Invalid(Exception):
    """An invalid response (raised inside a parser callback)."""


def _reason_text(reason: Failure | None) -> str:
    if reason is None:
        return "connection closed"
    return reason.getErrorMessage() or type(reason.value).__name__


def _is_tls_error(reason: Failure | None) -> bool:
    if reason is None:
        return False
    try:
        from OpenSSL.SSL import Error as SSLError
    except ImportError:  # pragma: no cover - twisted[tls] is required
        return False
    return reason.check(SSLError) is not None
