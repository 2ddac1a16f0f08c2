"""Socket options both sides of the proxy's transport set, and how the
client's connections are wired to their TCP transport."""

from __future__ import annotations

from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOProtocol

_WRAPPER = getattr(endpoints, "_WrappingProtocol", None)


def no_delay(transport) -> None:
    """Small writes go out at once (TCP_NODELAY): a request head and body,
    each relayed event. With Nagle's algorithm a write waits for the ACK of
    the previous one, which the peer may delay by up to 40 ms: a stream's
    events would reach the client in bursts, and its p99 would show it."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)  # TCP (TLS passes it on)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket after all, or already closed: nothing to tune


def direct_reads(protocol) -> None:
    """Twisted's client endpoints put a pass-through protocol
    (``endpoints._WrappingProtocol``, there to fire the connect Deferred)
    between the TCP transport and the protocol they connect - Lectr's, or
    the TLS layer around it: one more Python call for every read, for the
    life of a kept-alive connection. Once connected it has nothing left to
    do, so the TCP transport delivers to the protocol it wraps directly
    (reads, and the end of the connection). Call from ``connectionMade``;
    nothing happens if the wrapper is not there (another transport, or a
    Twisted that no longer has it)."""
    inner = protocol
    transport = protocol.transport
    if isinstance(transport, TLSMemoryBIOProtocol):
        inner, transport = transport, transport.transport
    wrapper = getattr(transport, "protocol", None)
    if (
        _WRAPPER is not None
        and type(wrapper) is _WRAPPER
        and getattr(wrapper, "_wrappedProtocol", None) is inner
    ):
        transport.protocol = inner
