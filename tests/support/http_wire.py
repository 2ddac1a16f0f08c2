"""Real-socket helpers for the lectr.http tests: a raw TCP client, a
scripted upstream server, a response splitter and a recording sink."""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class RawClient(Protocol):
    """Sends raw bytes, collects raw bytes, knows when the server closed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed = True

    async def until(self, pred, timeout: float = 5.0) -> None:
        """Wait until ``pred(self)`` holds (checked on every event and every
        10 ms, so it may look at server-side state too)."""
        deadline = reactor.seconds() + timeout
        while not pred(self):
            if reactor.seconds() > deadline:
                raise TimeoutError(f"condition not met; got {bytes(self.data)[:300]!r}")
            await sleep(0.01)

    async def responses(self, n: int, timeout: float = 5.0) -> list[Resp]:
        await self.until(lambda c: len(parse_responses(bytes(c.data))) >= n or c.closed, timeout)
        return parse_responses(bytes(self.data))

    async def closed_by_server(self, timeout: float = 5.0) -> None:
        await self.until(lambda c: c.closed, timeout)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.abortConnection()


async def connect(port: int) -> RawClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


@dataclass
class Resp:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: bool = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def parse_responses(data: bytes, head_only: bool = False) -> list[Resp]:
    """The complete responses at the start of ``data`` (1xx included)."""
    out: list[Resp] = []

    class P:
        def on_message_begin(self):
            self.headers, self.body = [], []

        def on_header(self, n, v):
            self.headers.append((n, v))

        def on_body(self, b):
            self.body.append(b)

        def on_message_complete(self):
            status = parser.get_status_code()
            out.append(Resp(status, self.headers, b"".join(self.body), status < 200))

    parser = httptools.HttpResponseParser(P())
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        pass
    return out


# --- a scripted upstream ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn: int


class _ScriptedConn(Protocol):
    def __init__(self, server: ScriptedUpstream, index: int) -> None:
        self.server = server
        self.index = index
        self.parser = httptools.HttpRequestParser(self)
        self.count = 0
        self.lost = False

    def connectionMade(self) -> None:
        self.server.conns.append(self)

    def on_message_begin(self):
        self.target, self.headers, self.body = b"", [], []

    def on_url(self, u):
        self.target += u

    def on_header(self, n, v):
        self.headers.append((n, v))

    def on_body(self, b):
        self.body.append(b)

    def on_message_complete(self):
        seen = Seen(
            self.parser.get_method(), self.target, self.headers, b"".join(self.body), self.index
        )
        self.server.seen.append(seen)
        self.count += 1
        self.server.script(self, seen)

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.lost = True
        self.server.closed.append(self.index)


class ScriptedUpstream(Factory):
    """An upstream whose answers are scripted: ``script(conn, seen)`` writes
    to ``conn.transport`` whatever the test needs (valid or not)."""

    def __init__(self, script) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.conns: list[_ScriptedConn] = []
        self.closed: list[int] = []
        self.port = None

    def buildProtocol(self, addr):
        return _ScriptedConn(self, len(self.conns))

    def listen(self) -> int:
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self.port.getHost().port

    async def stop(self) -> None:
        for c in self.conns:
            if c.transport is not None and not c.lost:
                c.transport.abortConnection()
        await self.port.stopListening()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += b"%x\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n\r\n"


# --- a sink that records ----------------------------------------------------------------------------


@dataclass
class RecordingSink:
    events: list[tuple] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: Deferred = field(default_factory=Deferred)
    on_data: object = None

    def response_started(self, status, reason, headers, length):
        self.events.append(("started", status, reason, headers, length))

    def response_data(self, data):
        self.events.append(("data", len(data)))
        self.data += data
        if self.on_data is not None:
            self.on_data(data)

    def response_done(self):
        self.events.append(("done",))
        self.ended.callback("done")

    def response_failed(self, error):
        self.events.append(("failed", error))
        self.ended.callback(error)

    @property
    def status(self):
        return next(e[1] for e in self.events if e[0] == "started")

    @property
    def kinds(self):
        return [e[0] for e in self.events]
