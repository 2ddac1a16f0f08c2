"""Second review of lectr.http: framing and reuse cases found by review."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory, Protocol

from lectr.http.client import Origin, UpstreamClient
from tests.support.http_wire import RecordingSink, sleep

# --- a response that arrives before the request was all sent -----------------------------------------


class _EarlyAnswer(Protocol):
    """Answers as soon as a request head arrives (keep-alive, no
    ``Connection: close``), without reading the body, and stops reading."""

    def __init__(self, server) -> None:
        self.server = server
        self.answer = server.answer
        self.received = 0
        self.lost = False

    def connectionMade(self) -> None:
        self.server.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received == len(data):  # the first read: the head is in it
            self.transport.write(self.answer)
            self.transport.pauseProducing()

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class _EarlyServer(Factory):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.conns: list[_EarlyAnswer] = []

    def buildProtocol(self, addr):
        return _EarlyAnswer(self)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
@pytest_twisted.ensureDeferred
async def test_a_response_before_the_request_body_was_sent_never_pools_the_connection(tls, close):
    """The upstream answered after reading only the head: the rest of the
    body is still queued to the connection. Reused, that body would go out
    ahead of the next request (the upstream is not reading it, or will take
    it for the next request); closed gracefully, the queued body would keep
    it open for as long as the upstream does not read. It is dropped (as Go's
    net/http does) and the next request gets a connection of its own."""
    extra = b"Connection: close\r\n" if close else b""
    server = _EarlyServer(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n%s\r\nno" % extra
    )
    if tls:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        from tests.test_http_client import _self_signed

        cert_pem, key_pem = _self_signed()
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        port = reactor.listenSSL(0, server, options, interface="127.0.0.1")
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
        url = f"https://localhost:{port.getHost().port}"
    else:
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        policy = None
        url = f"http://127.0.0.1:{port.getHost().port}"
    client = UpstreamClient(reactor, connect_timeout=2, idle_timeout=20, tls_policy=policy)
    try:
        origin = Origin.from_url(url)
        body = b"x" * (48 * 1024 * 1024)  # more than loopback's socket buffers take
        sink = RecordingSink()
        handle = client.request(origin, b"POST", b"/v1/x", [], body, sink)
        for _ in range(100):
            if handle._conn is not None:
                break
            await sleep(0.01)
        conn = handle._conn
        assert await sink.ended == "done"
        assert sink.status == 413 and bytes(sink.data) == b"no"
        assert server.conns[0].received < len(body)  # (the body was not all read)
        assert client.idle_count(origin) == 0
        for _ in range(100):  # and the connection is not kept open by its queued body
            if conn._lost:
                break
            await sleep(0.02)
        assert conn._lost
        second = RecordingSink()
        client.request(origin, b"POST", b"/v1/x", [], b"{}", second)
        assert await second.ended == "done"
        assert len(server.conns) == 2
    finally:
        for c in server.conns:  # (first: a graceful close would wait for the queued body)
            if not c.lost:
                c.transport.abortConnection()
        await client.close_idle()
        await port.stopListening()
