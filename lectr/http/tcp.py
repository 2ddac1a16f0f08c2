"""Socket options both sides of the proxy's transport set, how the
client's connections are wired to their TCP transport, and how both
sides write to it."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import endpoints, tcp
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


_EAGER = (tcp.Server, tcp.Client)


def unsent(transport) -> bool:
    """Whether bytes written to ``transport`` still wait in this process
    (Twisted's send buffer; a TLS layer's cleartext held for the handshake
    and the ciphertext under it) rather than in the kernel."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        if transport._appSendBuffer:
            return True
        transport = transport.transport
    return bool(getattr(transport, "dataBuffer", None) or getattr(transport, "_tempDataLen", 0))


def send(transport, parts: Sequence[bytes]) -> None:
    """Write ``parts`` in order, as ``transport.writeSequence`` would, but
    hand them to the kernel at once when nothing is queued ahead of them.

    Twisted's TCP transport queues every write and sends it on the next
    reactor turn: it registers the socket for writability (an
    ``epoll_ctl``), waits for the poll to report it, sends, and unregisters
    it (a second ``epoll_ctl``) - two system calls and a Python dispatch
    per write, i.e. per relayed stream event. A socket with an empty send
    queue is nearly always writable, so the parts go out in one
    ``sendmsg`` (scatter-gather: no joining) right away. Whatever the kernel
    does not take, and every write to anything but a plain TCP transport
    (TLS - so an https provider's requests, whose ciphertext the TLS layer
    writes itself - and test transports), goes through Twisted's queue as
    before, with its producer pausing; an error is left for that queue to
    meet and report as a lost connection.

    Used at once for the requests sent upstream, and at the end of the
    reactor turn for the answers to clients (lectr.http.server, ``_out``):
    measured side by side (bench/compare.py, 2026-12-03), sending both at
    once took a request-response at c=1 from 418 to 343 µs round trip, but
    sending the answers at once cost 6 % more CPU per request at c=32 -
    there, the queued answers of a busy reactor turn go out together and
    the clients' next requests arrive in larger batches - while sending only
    the upstream requests at once gave the same c=1 gain and cost nothing
    at c=32. Sending the answers at the end of their turn keeps that
    batching and saves the queue's registration (2026-12-04)."""
    if (
        type(transport) in _EAGER
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._aborting
    ):
        try:
            sent = transport.socket.sendmsg(parts)
        except OSError:  # would block, or the connection failed: Twisted's queue decides
            sent = 0
        for i, part in enumerate(parts):
            size = len(part)
            if sent < size:
                if sent:
                    rest = [part[sent:], *parts[i + 1 :]]
                else:
                    rest = parts[i:]
                transport.writeSequence(rest)
                return
            sent -= size
        return
    transport.writeSequence(parts)
