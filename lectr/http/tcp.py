"""Socket options both sides of the proxy's transport set."""

from __future__ import annotations


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
