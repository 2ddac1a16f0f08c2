"""lectr.http.tcp.send over real loopback TCP connections: parts go to the
kernel at once when nothing is queued, in order and whole whatever the
kernel takes, behind whatever Twisted already queued, and any other
transport gets Twisted's own writeSequence."""

from __future__ import annotations

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from lectr.http.tcp import send
from tests.support.http_wire import sleep


class Collect(Protocol):
    def __init__(self, expect: int) -> None:
        self.data = bytearray()
        self.expect = expect
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expect and not self.done.called:
            self.done.callback(bytes(self.data))


async def pair(expect: int):
    """A connected (client protocol, server collector, listening port)."""
    collectors: list[Collect] = []

    def build(_addr):
        collectors.append(Collect(expect))
        return collectors[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(_Factory(build))
    client = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
    )
    while not collectors:
        await sleep(0.01)
    return client, collectors[0], port


class _Factory(Factory):
    def __init__(self, build) -> None:
        self._build = build

    def buildProtocol(self, addr):
        return self._build(addr)


async def close(client, port) -> None:
    client.transport.loseConnection()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_parts_go_out_at_once_when_nothing_is_queued():
    client, server, port = await pair(6)
    transport = client.transport
    send(transport, (b"ab", b"", b"cdef"))
    # handed to the kernel in this call: nothing left for Twisted's queue,
    # and the socket was never registered for writability
    assert not transport._tempDataLen and not transport.dataBuffer
    assert transport not in reactor.getWriters()
    assert await server.done == b"abcdef"
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_parts_queue_behind_what_twisted_already_holds():
    client, server, port = await pair(6)
    transport = client.transport
    transport.write(b"first")  # queued until the next reactor turn
    send(transport, (b"!",))
    assert transport._tempDataLen == 6  # behind it, not ahead of it
    assert await server.done == b"first!"
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_queued_in_order():
    size = 64 * 1024 * 1024  # far more than a loopback socket buffers
    parts = [bytes([65 + i]) * (size // 4) for i in range(4)]
    client, server, port = await pair(size)
    transport = client.transport
    send(transport, parts)
    assert 0 < transport._tempDataLen < size  # some went at once, the rest waits
    assert await server.done == b"".join(parts)
    await close(client, port)


@pytest_twisted.ensureDeferred
async def test_a_failed_connection_is_left_to_twisted_to_report():
    client, server, port = await pair(1)
    lost = Deferred()
    client.connectionLost = lambda reason: lost.callback(reason.value)
    transport = client.transport
    transport.stopReading()  # the client will not hear of the reset by reading
    server.transport.abortConnection()  # RST
    await sleep(0.1)
    assert transport.connected
    send(transport, (b"x",))  # the kernel refuses; no exception here
    send(transport, (b"y",))
    reason = await lost  # Twisted's queue met the error and reported it
    assert isinstance(reason, ConnectionLost)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nothing_reaches_the_wire_once_the_connection_is_being_aborted():
    """Between ``abortConnection`` and ``connectionLost`` (the next turn) the
    transport still says connected; an abort drops what is unsent, so a
    send in that window must not put bytes on the wire either."""
    client, server, port = await pair(1)
    transport = client.transport
    transport.abortConnection()
    assert transport.connected  # (connectionLost is a turn away)
    send(transport, (b"late",))
    await sleep(0.1)
    assert bytes(server.data) == b""
    await port.stopListening()


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=64), max_size=8), queued=st.binary(max_size=8))
def test_other_transports_get_write_sequence(parts, queued):
    transport = StringTransport()
    transport.write(queued)
    send(transport, parts)
    assert transport.value() == queued + b"".join(parts)


@pytest_twisted.ensureDeferred
async def test_many_connections_keep_their_bytes_apart():
    """Every connection's bytes reach its own peer, whole and in order, when
    several connections send at once (the pool's usual state)."""
    conns = [await pair(3 * 1000) for _ in range(5)]
    for i in range(1000):
        for n, (client, _server, _port) in enumerate(conns):
            send(client.transport, (b"%d" % n, b"%02d" % (i % 100)))
    for n, (client, server, port) in enumerate(conns):
        got = await server.done
        assert got == b"".join(b"%d%02d" % (n, i % 100) for i in range(1000))
        await close(client, port)
