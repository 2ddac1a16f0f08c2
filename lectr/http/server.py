"""A lean HTTP/1.1 server protocol for the proxy port, parsing with llhttp.

Why not twisted.web: its Request/HTTPChannel cost more per request than the
whole relay (pure-Python line parsing, a Headers object with per-name
encoding, a Deferred per request, form parsing hooks); see
bench/profiles/. This protocol does only what a proxy port needs, strictly.

One :class:`ServerProtocol` per connection, one :class:`ServerRequest` per
request. The handler (duck-typed, see :class:`ProxyServerFactory`) gets:

- ``headers_received(req)`` as soon as the head is parsed, before any body
  byte is read (bytes that arrived in the same read as the head are held, not
  acted on). The handler then calls ``req.continue_body()`` (at once or after
  an asynchronous key check; only then is ``100 Continue`` sent and the body
  read) or answers at once with ``req.respond(...)`` — the body is then never
  read, and the connection closes after the answer unless the whole request
  was already in;
- ``body_received(req)`` once the whole body is in memory (``req.body``). It
  is called from ``continue_body()`` itself when the body was already
  complete;
- ``request_error(req, status, kind, message)`` for protocol-level problems
  after the head: 413 (``kind="too_large"``: a declared Content-Length over
  the cap, before reading; a chunked body as soon as it passes the cap; a
  trailer section over ``max_header_bytes``, as soon as it passes it) and
  408 (``kind="body_timeout"``: the body not complete within
  ``body_timeout`` seconds of ``continue_body()``, a total deadline). The
  handler answers with ``req.respond`` in its route's error dialect (if it
  does not, a minimal JSON answer is sent); the connection then closes.

Requests that cannot be parsed at all get a minimal 400 JSON answer from the
server itself and the connection closes (431 for a header section over
``max_header_bytes``). What counts as unparseable (tests/test_http_server.py
holds the catalogue): anything llhttp refuses in strict mode (bad request
line, unknown method, bad header syntax or characters, obs-fold, bare CR or
LF, Content-Length with Transfer-Encoding, duplicate or malformed
Content-Length, bad chunk framing), plus: a Transfer-Encoding other than
exactly ``chunked`` (or any on HTTP/1.0), a version other than 1.0/1.1, a
request-target that is not origin-form (absolute-, authority- and
asterisk-form), or that has control bytes, bytes >= 0x80, ``#`` or ``%`` not
followed by two hex digits, and Upgrade/CONNECT requests. As RFC 9112 §3
permits, several spaces between method and target are accepted.

Connections: keep-alive; pipelined requests are answered one at a time, in
order (the requests of one read are parsed ahead, at most
``MAX_PIPELINED``; data read while a request is answered is held unparsed, up
to 64 KiB, then the socket is no longer read). Reading stops while the
handler decides on a head; it goes on while a request is answered, so a
client that disconnects is noticed at once (``req.on_lost``).
``header_timeout`` bounds the arrival of a head (from the connection's start
or the first byte of a request: slowloris), ``keepalive_timeout`` the
silence between requests; either closes the connection without an answer.

``max_unadmitted``: connections that have not been admitted (``req.admit()``,
once the handler accepted a key) are counted per factory; over the cap, new
connections are closed at once (``refused_unadmitted`` counts them).
"""

from __future__ import annotations

import re
from http import HTTPStatus

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.http.headers import HeaderList
from lectr.http.tcp import no_delay, send

#: requests parsed ahead from one read while an earlier one is answered
MAX_PIPELINED = 16
#: bytes read and held unparsed while a request is answered, before the
#: socket stops being read
MAX_HELD = 64 * 1024

# origin-form only: '/' then visible ASCII except '#', '%' only as %XX
_TARGET = re.compile(rb"/(?:[\x21\x22\x24\x26-\x7e]|%[0-9A-Fa-f]{2})*")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
_FRAMING_LENGTHS = frozenset(map(len, _FRAMING))
_NO_BODY_STATUS = frozenset({204, 304})
_STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii")) for s in HTTPStatus
}

# connection deadlines
_NONE, _HEADER, _KEEPALIVE, _BODY = 0, 1, 2, 3


class _Stop(Exception):
    """Raised from a parser callback to stop parsing the current read."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def _error_body(message: str) -> bytes:
    return b'{"error":{"message":"%s","type":"invalid_request_error"}}' % message.encode("ascii")


class ProxyServerFactory(ServerFactory):
    """Builds one :class:`ServerProtocol` per connection; usable with any
    Twisted endpoint (``tcp:``, ``unix:``, adopted sockets).

    Counters (plain ints, also exported when ``metrics`` is given):
    ``unadmitted`` (connections now not admitted:
    ``lectr_http_unadmitted_connections``), ``refused_unadmitted``
    (``lectr_http_connections_refused_total``), ``bad_requests`` (400/431
    answered by the server itself: ``lectr_http_bad_requests_total``),
    ``header_timeouts`` (``lectr_http_header_timeouts_total``).
    """

    noisy = False
    _log = Logger()

    def __init__(
        self,
        handler,
        *,
        reactor,
        max_body_bytes: int,
        body_timeout: float,
        header_timeout: float,
        keepalive_timeout: float,
        max_header_bytes: int = 64 * 1024,
        max_unadmitted: int = 2048,
        metrics=None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_header_bytes = max_header_bytes
        self.max_unadmitted = max_unadmitted
        self.unadmitted = 0
        self.refused_unadmitted = 0
        self.turn_writes = TurnWrites(reactor)
        self.bad_requests = 0
        self.header_timeouts = 0
        self._m_refused = self._m_bad = self._m_header_timeouts = None
        if metrics is not None:
            self._m_refused = metrics.counter(
                "lectr_http_connections_refused_total",
                "Proxy connections closed at once: too many waiting for a key check "
                "(LECTR_MAX_UNAUTHENTICATED)",
            )
            self._m_bad = metrics.counter(
                "lectr_http_bad_requests_total",
                "Requests the proxy's HTTP server refused itself (malformed, ambiguous "
                "framing, head too large)",
            )
            self._m_header_timeouts = metrics.counter(
                "lectr_http_header_timeouts_total",
                "Proxy connections closed because a request head did not arrive in time",
            )
            metrics.callback_gauge(
                "lectr_http_unadmitted_connections",
                "Proxy connections whose request has no checked key yet",
                lambda: self.unadmitted,
            )

    def count_bad_request(self) -> None:
        self.bad_requests += 1
        if self._m_bad is not None:
            self._m_bad.inc()

    def count_header_timeout(self) -> None:
        self.header_timeouts += 1
        if self._m_header_timeouts is not None:
            self._m_header_timeouts.inc()

    def buildProtocol(self, addr):
        if self.unadmitted >= self.max_unadmitted:
            self.refused_unadmitted += 1
            if self._m_refused is not None:
                self._m_refused.inc()
            return None  # Twisted closes the connection at once
        self.unadmitted += 1
        return ServerProtocol(self)


class ServerRequest:
    """One request on a :class:`ServerProtocol` (see the module docstring)."""

    __slots__ = (
        "method",
        "target",
        "path",
        "query",
        "version",
        "headers",
        "body",
        "started",
        "finished",
        "on_lost",
        "context",
        "_proto",
        "_chunks",
        "_size",
        "_length",
        "_keep_alive",
        "_expect",
        "_head_done",
        "_wire",
        "_complete",
        "_continued",
        "_delivered",
        "_too_large",
        "_chunked",
        "_body_seen",
        "_framing",
        "_no_body",
        "_close",
        "_peer",
    )

    def __init__(self, proto: ServerProtocol) -> None:
        self._proto = proto
        self.method = b""
        self.target = b""
        self.path = b""
        self.query = b""
        self.version = b"1.1"
        self.headers = HeaderList()
        self.body = b""
        self.started = False
        self.finished = False
        self.on_lost = None
        self.context = None  # the handler's own state for this request
        self._chunks: list[bytes] | None = None
        self._size = 0
        self._length: int | None = None
        self._keep_alive = False
        self._expect = False
        self._head_done = False
        self._wire = 0  # bytes read after the head: body, chunk framing, trailers
        self._complete = False
        self._continued = False
        self._delivered = False
        self._too_large = False
        self._chunked = False
        self._body_seen = False  # body data in the read being parsed
        self._framing = 0  # bytes of the reads since the body's last data (chunk framing, trailers)
        self._no_body = False
        self._close = False
        self._peer: str | None = None

    # --- facts ------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        """The client's address (``host:port``, or the socket path)."""
        if self._peer is None:
            transport = self._proto.transport
            addr = transport.getPeer() if transport is not None else None
            if hasattr(addr, "port"):
                self._peer = f"{addr.host}:{addr.port}"
            else:
                self._peer = str(getattr(addr, "name", None) or addr or "-")
        return self._peer

    def admit(self) -> None:
        """The connection is authenticated: it no longer counts against
        ``max_unadmitted``."""
        self._proto._admit()

    # --- body control -------------------------------------------------------------------

    def continue_body(self) -> None:
        """Read the body (sending ``100 Continue`` first if the client asked
        for it). ``handler.body_received(self)`` follows once it is complete —
        from within this call when it already is."""
        if self._continued or self.finished:
            return
        self._continued = True
        proto = self._proto
        if self._complete:
            proto._deliver_body(self)
            return
        if self._expect and not self._size and self.version == b"1.1" and not self.started:
            proto._out((b"HTTP/1.1 100 Continue\r\n\r\n",))
        proto._set_deadline(_BODY, proto.factory.body_timeout)
        if not proto._feeding:
            proto._pump()

    # --- answering ---------------------------------------------------------------------------

    def close_after(self) -> None:
        """Close the connection once this request's answer is sent (its head
        then says ``Connection: close``): e.g. while shutting down."""
        self._close = True

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete response with Content-Length, in one write."""
        if self.started or self.finished:
            return
        head = self._head(status, None, headers, len(body))
        self.started = True
        if self._no_body or not body:
            self._proto._out((head,))
        else:
            self._proto._out((head, body))
        self.finish()

    def start_response(
        self,
        status: int,
        reason: bytes | None,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        block: bytes = b"",
    ) -> None:
        """Send the head now. ``length`` None: chunked (HTTP/1.1) or
        close-delimited (HTTP/1.0). Never a body for HEAD, 1xx, 204, 304.
        Framing headers in ``headers`` (Content-Length, Transfer-Encoding,
        Connection, Keep-Alive) are dropped: the server sets them.
        ``block``: more header lines, rendered by Lectr itself from numbers
        and constants (``Name: value\\r\\n`` each: the limits'
        x-ratelimit-* headers), written as they are, after the check of
        ``headers`` - never request or provider data."""
        if self.started or self.finished:
            return
        head = self._head(status, reason, headers, length, block)
        self.started = True
        self._proto._out((head,))

    def _head(self, status, reason, headers, length, block=b"") -> bytes:
        proto = self._proto
        no_body = self.method == b"HEAD" or status < 200 or status in _NO_BODY_STATUS
        self._no_body = no_body
        close = self._close or not self._keep_alive or proto._closing or not self._complete
        if reason is None:
            line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        else:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        lines = [line]
        n = 1  # the lines so far, each ending in CRLF
        for name, value in headers:
            # (the length first: most names cannot be a framing header)
            if len(name) in _FRAMING_LENGTHS and name.lower() in _FRAMING:
                continue
            lines += (name, b": ", value, b"\r\n")  # (no temporary per line)
            n += 1
        mark = len(lines)  # (each line from here is a whole one)
        if status >= 200 and status not in _NO_BODY_STATUS:
            if length is not None:
                lines.append(b"Content-Length: %d\r\n" % length)
            elif self.method != b"HEAD":
                if self.version == b"1.1":
                    self._chunked = True
                    lines.append(b"Transfer-Encoding: chunked\r\n")
                else:
                    close = True  # close-delimited
        if close:
            self._close = True
            lines.append(b"Connection: close\r\n")
        elif self.version == b"1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        # One CRLF per line: a CR or LF inside a name or value would split
        # the response (header injection). Cheap to check whole.
        n += len(lines) - mark
        if head.count(b"\n") != n or head.count(b"\r") != n:
            raise ValueError("CR or LF in a response header name or value")
        if block:  # (Lectr's own lines, after the check: nothing in them can offset it)
            head = b"".join((head[:-2], block, b"\r\n"))
        return head

    def write(self, data: bytes) -> None:
        if self.finished or self._no_body or not data:
            return
        if self._chunked:
            self._proto._out((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self._proto._out((data,))

    def write_sequence(self, parts: list[bytes]) -> None:
        """Several pieces in one transport call (one chunk when chunked)."""
        if self.finished or self._no_body:
            return
        if self._chunked:
            size = sum(map(len, parts))
            if size:
                self._proto._out([b"%x\r\n" % size, *parts, b"\r\n"])
        else:
            self._proto._out(parts)

    def finish(self) -> None:
        """End the response (the last chunk when chunked)."""
        if self.finished:
            return
        if not self.started:
            raise RuntimeError("finish() before the response was started")
        self.finished = True
        self.on_lost = self.context = None
        if self._chunked:
            self._proto._out((b"0\r\n\r\n",))
        self._proto._request_done(self)

    def after_sent(self, fn) -> None:
        """Call ``fn()`` once this turn's answers are sent (at the end of the
        turn): bookkeeping that need not hold the answer back."""
        self._proto.factory.turn_writes.after(fn)

    def abort(self) -> None:
        """Abort the connection: a truncated response must never look
        complete. ``on_lost`` is not called."""
        if self.finished:
            return
        self.finished = True
        self.on_lost = self.context = None
        self._proto._abort()

    # --- backpressure ----------------------------------------------------------------------------

    def set_producer(self, producer) -> None:
        """``producer`` (pauseProducing/resumeProducing/stopProducing) is
        paused while the client's socket buffer is full, and stopped if the
        connection is lost."""
        transport = self._proto.transport
        if transport is not None and not self.finished:
            transport.registerProducer(producer, True)

    def clear_producer(self) -> None:
        transport = self._proto.transport
        if transport is not None and transport.producer is not None:
            transport.unregisterProducer()

    def __repr__(self) -> str:
        return f"<ServerRequest {self.method.decode('ascii', 'replace')} {self.path[:80]!r}>"


class ServerProtocol(Protocol):
    """One client connection (see the module docstring)."""

    _log = Logger()

    __slots__ = (
        "factory",
        "transport",
        "connected",
        "_parser",
        "_cur",
        "_active",
        "_queue",
        "_held",
        "_held_size",
        "_feeding",
        "_closing",
        "_stopped",
        "_reading",
        "_admitted",
        "_head_bytes",
        "_head_ws",
        "_cur_began",
        "_deadline",
        "_dkind",
        "_timer",
        "_lost",
        "_pending",
        "_pending_size",
    )

    def __init__(self, factory: ProxyServerFactory) -> None:
        self.factory = factory
        self.transport = None
        self.connected = 0
        self._parser = HttpRequestParser(self)
        self._cur: ServerRequest | None = None  # the message being parsed
        self._active: ServerRequest | None = None  # the request being handled
        self._queue: list[ServerRequest] | None = None  # parsed ahead (pipelining)
        self._held: list[bytes] | None = None  # read while answering, not parsed yet
        self._held_size = 0
        self._feeding = False
        self._closing = False
        self._stopped = False  # parse nothing more (answer what is in hand, then close)
        self._reading = True
        self._admitted = False
        self._head_bytes = 0
        self._head_ws = 0  # trailing whitespace stripped from the head's values
        self._cur_began = 0.0  # when a head began behind an active request
        self._deadline = 0.0
        self._dkind = _NONE
        self._timer = None
        self._lost = False
        self._pending: list[bytes] | None = None  # written this turn, not sent yet
        self._pending_size = 0

    # --- connection ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)  # each relayed event goes out as it is written
        self._set_deadline(_HEADER, self.factory.header_timeout)

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self._pending = None
        self._closing = True
        self._deadline = 0.0
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._admitted:
            self._admitted = True
            self.factory.unadmitted -= 1
        req, self._active = self._active, None
        self._queue = self._held = None
        self._cur = None
        if req is not None and not req.finished:
            req.finished = True
            hook, req.on_lost = req.on_lost, None
            req.context = None
            if hook is not None:
                try:
                    hook(reason if reason is not None else Failure(ConnectionError("lost")))
                except Exception:
                    self._log.failure("on_lost hook failed")

    def _admit(self) -> None:
        if not self._admitted:
            self._admitted = True
            self.factory.unadmitted -= 1

    def _abort(self) -> None:
        self._closing = True
        self._pending = None
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self._lost:
            self._flush_out()
            self.transport.loseConnection()

    # --- writing -------------------------------------------------------------------------------

    def _out(self, parts) -> None:
        """Write ``parts`` at the end of this reactor turn, after every
        other write the turn makes to this connection, in one ``sendmsg``
        (:func:`lectr.http.tcp.send`). Twisted's own write path registers
        the socket for writability, waits for the poll to say so, dispatches
        the write and unregisters it: two ``epoll_ctl`` calls and a Python
        dispatch per answer. Sent at the end of the turn rather than at once,
        the answers of a busy turn still go out together (sending each at
        once cost CPU at c=32: the clients' next requests then arrive one by
        one). Past ``PENDING_MAX`` bytes the parts go at once, into a
        transport whose buffer pauses the producer: backpressure holds
        within a turn too."""
        pending = self._pending
        if pending is None:
            self._pending = pending = []
            self._pending_size = 0
            self.factory.turn_writes.add(self)
        pending.extend(parts)
        self._pending_size += sum(map(len, parts))
        if self._pending_size > PENDING_MAX:
            self._flush_out()

    def _flush_out(self) -> None:
        """Send this connection's pending writes. A send that raises (not a
        socket error, which Twisted's queue meets as a lost connection: a
        part that is not bytes, a producer failing to pause) is this
        connection's alone: it is cut - its answer must not go on with a
        part missing and look complete - and the other connections of the
        turn are still sent."""
        parts, self._pending = self._pending, None
        if parts and not self._lost and self.transport is not None:
            try:
                send(self.transport, parts)
            except Exception:
                self._log.failure("sending an answer to the client failed; connection cut")
                self._abort()

    # --- reading -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._stopped:
            return
        active = self._active
        if active is not None and (active._complete or not active._continued):
            # deciding on a head, or answering: hold what comes, unparsed
            if self._held is None:
                self._held = [data]
            else:
                self._held.append(data)
            self._held_size += len(data)
            self._update_reading()
            return
        self._feed(data)
        self._pump()

    def _feed(self, data: bytes) -> None:
        before = self._cur
        in_body = before is not None and before._head_done
        if in_body:
            before._body_seen = False
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._bad(400, "Upgrade and CONNECT requests are not supported.")
        except HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _BadRequest):
                self._bad(cause.status, cause.message)
            elif isinstance(cause, _Stop):
                pass
            elif cause is not None:
                self._crash(cause)
            else:
                self._bad(400, _describe(e))
        finally:
            self._feeding = False
        cur = self._cur
        if self._stopped or cur is None:
            return
        if not cur._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > self.factory.max_header_bytes:
                self._bad(431, "Request header section too large.")
        elif in_body and cur is before:
            # a read wholly within the body: the body is bounded by on_body,
            # and chunk framing, extensions and trailers (which llhttp
            # accumulates) with it - a trailer of any size is refused
            cur._wire += len(data)
            factory = self.factory
            if cur._wire > factory.max_body_bytes + factory.max_header_bytes:
                self._refuse_overlong(cur)
            elif cur._body_seen:
                cur._framing = 0
            else:
                # a read with no body data: chunk framing, or the last
                # chunk's trailer section, which llhttp joins field by field
                # read by read (a copy of all of it per read: 32 MiB held the
                # reactor 8 s in all); the trailers are dropped, bounded as
                # the head is
                cur._framing += len(data)
                if cur._framing > factory.max_header_bytes:
                    self._refuse_overlong(cur, "Request trailer section too large.")

    def _update_reading(self) -> None:
        """Read the socket unless a head awaits the handler's decision, or
        too much was held while answering."""
        transport = self.transport
        if transport is None or self._lost:
            return
        active = self._active
        if self._closing:
            want = False
        elif active is None or (active._continued and not active._complete):
            want = not self._stopped
        elif not active._continued and not active._complete:
            want = False  # the handler is deciding on the head: no body byte read
        else:
            # answering: keep reading (a disconnect is noticed at once), hold
            # what comes, up to a bound
            want = self._held_size < MAX_HELD
        if want != self._reading:
            self._reading = want
            if want:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    # --- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing or self._stopped:
            raise _Stop()
        if self._queue is not None and len(self._queue) >= MAX_PIPELINED:
            self._closing_after_queue()
            raise _Stop()
        self._cur = ServerRequest(self)
        self._head_bytes = 0
        self._head_ws = 0
        if self._active is None:
            if self._dkind == _KEEPALIVE:
                self._set_deadline(_HEADER, self.factory.header_timeout)
        else:  # (its header deadline starts when the active request is done)
            self._cur_began = self.factory.reactor.seconds()

    def on_url(self, url: bytes) -> None:
        req = self._cur
        req.target = req.target + url if req.target else url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._cur
        if req is None or req._head_done:
            return  # chunked trailers: dropped
        if value and value[-1] in (32, 9):
            stripped = value.rstrip(b" \t")
            self._head_ws += len(value) - len(stripped)  # (counted against the limit)
            value = stripped
        req.headers.raw.append((name, value))

    def on_headers_complete(self) -> None:
        req = self._cur
        parser = self._parser
        req._head_done = True
        version = parser.get_http_version()
        if version == "1.1":
            req.version = b"1.1"
        elif version == "1.0":
            req.version = b"1.0"
        else:
            raise _BadRequest(400, "Unsupported HTTP version.")
        target = req.target
        if not _TARGET.fullmatch(target):
            raise _BadRequest(400, _target_problem(target))
        q = target.find(b"?")
        if q < 0:
            req.path = target
        else:
            req.path = target[:q]
            req.query = target[q:]
        if parser.should_upgrade():
            raise _BadRequest(400, "Upgrade and CONNECT requests are not supported.")
        req.method = parser.get_method()
        req._keep_alive = parser.should_keep_alive()
        headers = req.headers
        size = len(target) + self._head_ws
        for name, value in headers.raw:
            size += len(name) + len(value) + 4
        if size > self.factory.max_header_bytes:
            raise _BadRequest(431, "Request header section too large.")
        te = headers.get(b"transfer-encoding")
        if te:
            if len(te) != 1 or te[0].lower() != b"chunked" or req.version == b"1.0":
                raise _BadRequest(400, "Unsupported Transfer-Encoding.")
        else:
            cl = headers.first(b"content-length")
            if cl is not None:
                req._length = int(cl)  # llhttp checked: digits only, one field
            if not req._length:
                # no body: the request is whole (llhttp completes it next)
                req._complete = True
        expect = headers.first(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise _BadRequest(400, "Unsupported Expect.")
            req._expect = True
        self._head_bytes = 0
        if self._active is None:
            self._start(req)
        else:
            if self._queue is None:
                self._queue = [req]
            else:
                self._queue.append(req)

    def on_body(self, data: bytes) -> None:
        req = self._cur
        req._body_seen = True
        if req.finished:
            return  # answered already: the rest of the body is dropped
        size = req._size + len(data)
        req._size = size
        if size > self.factory.max_body_bytes:
            if not req._too_large:
                req._too_large = True
                req._chunks = None
                if req is self._active:
                    self._refuse_too_large(req)
            raise _Stop()
        chunks = req._chunks
        if chunks is None:
            req._chunks = [data]
        else:
            chunks.append(data)

    def on_message_complete(self) -> None:
        req = self._cur
        self._cur = None
        req._complete = True
        if req is self._active:
            if self._dkind == _BODY:
                self._deadline = 0.0
                self._dkind = _NONE
            if req._continued and not req.finished:
                self._deliver_body(req)

    # --- the request's life ---------------------------------------------------------------------------

    def _start(self, req: ServerRequest) -> None:
        """``req``'s head is complete and it is next in line: hand it over."""
        self._active = req
        self._deadline = 0.0
        self._dkind = _NONE
        if req._too_large or (
            req._length is not None and req._length > self.factory.max_body_bytes
        ):
            req._too_large = True
            self._refuse_too_large(req)
            return
        try:
            self.factory.handler.headers_received(req)
        except Exception:
            self._handler_failed(req, Failure())
            return
        if not self._feeding:
            self._update_reading()

    def _deliver_body(self, req: ServerRequest) -> None:
        if req._delivered or req.finished:
            return
        req._delivered = True
        chunks, req._chunks = req._chunks, None
        if chunks:
            req.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            self.factory.handler.body_received(req)
        except Exception:
            self._handler_failed(req, Failure())

    def _refuse_overlong(
        self, req: ServerRequest, message: str = "Request body too large."
    ) -> None:
        """A body with more bytes on the wire than the body and head limits
        together (chunk framing, extensions, trailers), or a trailer section
        over the head limit: 413, parse no more."""
        req._too_large = True
        req._chunks = None
        if req is self._active:
            self._refuse_too_large(req, message)
        else:
            self._closing_after_queue()

    def _refuse_too_large(
        self, req: ServerRequest, message: str = "Request body too large."
    ) -> None:
        req._close = True
        self._closing_after_queue()
        self._request_error(req, 413, "too_large", message)

    def _request_error(self, req: ServerRequest, status: int, kind: str, message: str) -> None:
        req._close = True
        if not req.finished:
            try:
                self.factory.handler.request_error(req, status, kind, message)
            except Exception:
                self._handler_failed(req, Failure())
                return
        if not req.started and not req.finished:
            req.respond(status, [(b"Content-Type", b"application/json")], _error_body(message))
        elif not req.finished:
            req.abort()

    def _handler_failed(self, req: ServerRequest, failure: Failure) -> None:
        self._log.failure("proxy handler failed", failure)
        if req.finished:
            return
        if req.started:
            req.abort()
        else:
            req._close = True
            req.respond(
                500,
                [(b"Content-Type", b"application/json")],
                _error_body("Internal error in the gateway."),
            )

    def _request_done(self, req: ServerRequest) -> None:
        """``req``'s response is complete: close, or go on to the next."""
        if req is not self._active:
            return
        self._active = None
        transport = self.transport
        if transport is not None and transport.producer is not None:
            transport.unregisterProducer()
        if req._close or self._lost:
            self._close()
            return
        cur = self._cur
        if cur is not None and not cur._head_done:
            # a head began while that request was answered: it has what is
            # left of its header_timeout (not the idle connection's timeout)
            factory = self.factory
            left = self._cur_began + factory.header_timeout - factory.reactor.seconds()
            self._set_deadline(_HEADER, max(left, 0.0))
        else:
            self._set_deadline(_KEEPALIVE, self.factory.keepalive_timeout)
        if not self._feeding:
            self._pump()

    def _pump(self) -> None:
        """Go on with whatever waits: a parsed-ahead request, held data."""
        while not self._closing and not self._lost:
            active = self._active
            if active is None:
                queue = self._queue
                if queue:
                    req = queue.pop(0)
                    if not queue:
                        self._queue = None
                    self._start(req)
                    if self._active is req and req._complete and req._continued:
                        self._deliver_body(req)
                    continue
                if self._stopped:
                    self._close()
                    return
            elif active._complete or not active._continued:
                break  # deciding or answering: held data waits
            held = self._held
            if not held:
                break
            self._held = None
            self._held_size = 0
            self._feed(held[0] if len(held) == 1 else b"".join(held))
        self._update_reading()

    def _closing_after_queue(self) -> None:
        """Parse nothing more; answer the requests in hand, then close."""
        self._stopped = True
        self._held = None
        self._held_size = 0
        if self._queue:
            self._queue[-1]._close = True
        elif self._active is not None:
            self._active._close = True
        elif not self._feeding:
            self._close()

    # --- errors and timers ----------------------------------------------------------------------------

    def _bad(self, status: int, message: str) -> None:
        """An unparseable request. Nothing in hand: a minimal answer, then
        close. A malformed body of the request in hand: the handler answers
        (``request_error``), then close. Else: answer what is in hand (parsed
        before the bad bytes), then close."""
        self.factory.count_bad_request()
        cur, self._cur = self._cur, None
        queue = self._queue
        if cur is not None and queue and cur in queue:
            queue.remove(cur)
            if not queue:
                self._queue = None
        active = self._active
        if active is not None and active is cur:
            self._closing_after_queue()
            if not active.finished:
                self._request_error(active, status, "bad_request", message)
            return
        if active is not None or self._queue:
            self._closing_after_queue()
            return
        self._stopped = True
        self._closing = True
        if self.transport is not None and not self._lost:
            body = _error_body(message)
            line = _STATUS_LINES.get(status, b"HTTP/1.1 400 Bad Request\r\n")
            self._out(
                (
                    line + b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body),
                )
            )
            self._close()

    def _crash(self, exc: BaseException) -> None:
        self._log.failure("proxy server protocol failed", Failure(exc))
        req = self._active
        if req is not None and not req.finished:
            self._handler_failed(req, Failure(exc))
        self._abort()

    def _set_deadline(self, kind: int, seconds: float) -> None:
        reactor = self.factory.reactor
        deadline = reactor.seconds() + seconds
        self._deadline = deadline
        self._dkind = kind
        timer = self._timer
        if timer is None:
            self._timer = reactor.callLater(seconds, self._on_timer)
        elif timer.getTime() > deadline:
            timer.reset(seconds)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline or self._lost:
            return
        reactor = self.factory.reactor
        now = reactor.seconds()
        if now < deadline:
            self._timer = reactor.callLater(deadline - now, self._on_timer)
            return
        kind, self._dkind = self._dkind, _NONE
        self._deadline = 0.0
        if kind == _BODY:
            req = self._active
            if req is not None and not req.finished and not req._complete:
                self._closing_after_queue()
                self._request_error(req, 408, "body_timeout", "Request body not received in time.")
        elif kind == _HEADER:
            self.factory.count_header_timeout()
            self._abort()
        elif kind == _KEEPALIVE:
            self._close()


#: bytes a connection's writes of one turn may hold before they go at once
PENDING_MAX = 64 * 1024


class TurnWrites:
    """The connections written to in this reactor turn, sent at its end: one
    ``callLater(0)`` per turn for all of them; then what was to run once
    they were sent (:meth:`ServerRequest.after_sent`)."""

    __slots__ = ("reactor", "protos", "call", "then")

    _log = Logger()

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.protos: list = []
        self.call = None
        self.then: list = []

    def add(self, proto) -> None:
        self.protos.append(proto)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def after(self, fn) -> None:
        self.then.append(fn)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.call = None
        protos, self.protos = self.protos, []
        for proto in protos:
            proto._flush_out()
        then = self.then
        if then:
            self.then = []
            stop = None
            for fn in then:
                try:
                    fn()
                except Exception:
                    self._log.failure("after the answers of a turn were sent: {fn!r}", fn=fn)
                except BaseException as e:  # (the others still run: each records a request)
                    stop = stop or e
            if stop is not None:
                raise stop


def _describe(e: HttpParserError) -> str:
    text = str(e) or "Malformed request."
    # llhttp's reasons are short ASCII phrases; keep them, minus quotes
    return "Malformed request: " + "".join(c for c in text if c.isalnum() or c in " -.,").strip()


def _target_problem(target: bytes) -> str:
    if not target.startswith(b"/"):
        return "The request target must be a path (origin-form)."
    return "Invalid character or percent-encoding in the request target."
