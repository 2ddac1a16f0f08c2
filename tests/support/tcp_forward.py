"""A TCP forwarder on 127.0.0.1 that a test controls, to put between Lectr
and PostgreSQL: simulate an outage (connections cut, new ones refused)
without touching the shared server.

    fwd = await TcpForwarder.start("127.0.0.1", 5432)
    url = fwd.rewrite(db_url)      # the same database, through the forwarder
    fwd.go_down()                  # cut every connection, refuse new ones
    fwd.come_back()                # accept and forward again
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg2.extensions import parse_dsn
from twisted.internet import reactor as default_reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol


class _Upstream(Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.downstream.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    def __init__(self, forwarder: TcpForwarder) -> None:
        self.forwarder = forwarder
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        fwd = self.forwarder
        if not fwd.accepting:
            fwd.refused += 1
            self.transport.abortConnection()
            return
        fwd.connections.add(self)
        fwd.accepted += 1
        if fwd.target_host.startswith("/"):  # a Unix-socket directory (embedded PostgreSQL)
            endpoint = UNIXClientEndpoint(
                fwd.reactor, f"{fwd.target_host}/.s.PGSQL.{fwd.target_port}"
            )
        else:
            endpoint = TCP4ClientEndpoint(fwd.reactor, fwd.target_host, fwd.target_port)
        d = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        d.addErrback(lambda _: self.transport.abortConnection())

    def upstream_ready(self, upstream: _Upstream) -> None:
        if self not in self.forwarder.connections:
            upstream.transport.abortConnection()
            return
        self.upstream = upstream
        for data in self.pending:
            upstream.transport.write(data)
        self.pending.clear()

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.forwarder.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()

    def cut(self) -> None:
        self.forwarder.connections.discard(self)
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()


class TcpForwarder:
    def __init__(self, target_host: str, target_port: int, reactor) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.reactor = reactor
        self.accepting = True
        self.connections: set[_Downstream] = set()
        self.accepted = 0
        self.refused = 0
        self.port = None

    @classmethod
    async def start(cls, target_host: str, target_port: int, reactor=default_reactor):
        fwd = cls(target_host, target_port, reactor)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        fwd.port = await endpoint.listen(Factory.forProtocol(lambda: _Downstream(fwd)))
        return fwd

    @classmethod
    async def in_front_of(cls, url: str, reactor=default_reactor) -> TcpForwarder:
        params = parse_dsn(url)  # host may be a Unix-socket directory (?host=/path)
        host = params.get("host") or "127.0.0.1"
        return await cls.start(host, int(params.get("port") or 5432), reactor)

    @property
    def listen_port(self) -> int:
        return self.port.getHost().port

    def rewrite(self, url: str) -> str:
        """``url`` with its host and port replaced by the forwarder's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.listen_port}"
        query = urlencode(
            [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "hostaddr", "port")]
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def go_down(self) -> None:
        """PostgreSQL 'crashes': open connections are cut, new ones refused."""
        self.accepting = False
        for conn in list(self.connections):
            conn.cut()

    def come_back(self) -> None:
        self.accepting = True

    async def stop(self) -> None:
        self.go_down()
        await self.port.stopListening()
