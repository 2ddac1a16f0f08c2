"""twisted.web pieces of the admin port: a capped in-memory request body,
and answering a request the channel will not read to its end."""

from __future__ import annotations

from io import BytesIO

#: how long a refused client may go on sending before its connection is cut
LINGER_SECONDS = 2.0


def _discard(data: bytes) -> None:
    pass


def answer_and_close(channel, response: bytes) -> None:
    """Write a whole raw ``response`` on ``channel`` (a twisted.web
    ``HTTPChannel``) and end the connection so that the client does read it.

    Closing a socket whose peer is still sending makes the kernel answer
    with a reset, which can destroy the response on its way: the client sees
    the connection reset, or nothing at all. So the close lingers, as web
    servers do for a refused request: the write side is shut once the
    response is out (the client reads it, then the end of the stream), what
    the client still sends is read and dropped, and the connection is
    closed when the client closes it, or cut after ``LINGER_SECONDS``."""
    transport = channel.transport
    if transport is None or not transport.connected:
        return
    channel.setTimeout(None)  # the lingering has its own limit
    # later input is dropped unread (twisted.web itself does this on a
    # connection that is no longer persistent)
    channel.dataReceived = _discard
    transport.write(response)
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        channel.loseConnection()
        return
    lose_write()

    def cut() -> None:
        if transport.connected:
            transport.abortConnection()

    call = channel.callLater(LINGER_SECONDS, cut)
    lost = channel.connectionLost

    def connection_lost(reason) -> None:
        if call.active():  # the client closed first: nothing left to cut
            call.cancel()
        lost(reason)

    channel.connectionLost = connection_lost


class _Discard:
    """A content sink for a refused body."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> None:
        pass

    def read(self, *args) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def getvalue(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class CappedBodyRequest:
    """A mixin for twisted.web Requests: the body is kept in memory (never
    spooled to a temporary file, as twisted.web does past 100 kB) and capped
    at ``channel.site.max_body_bytes``. A declared Content-Length over the cap
    is refused before the body is read; a chunked body as soon as it passes
    the cap. Subclasses answer in ``refuse_too_large(target)`` — on the raw
    transport, since the request line has not been processed yet — and
    close the connection."""

    _body_size = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body_bytes:
            self.content = _Discard()
            self._refuse()
        else:
            self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self.channel.site.max_body_bytes:
            self.content = _Discard()  # let go of what was buffered
            self._refuse()
            return
        self.content.write(data)

    def _refuse(self) -> None:
        self._refused = True
        # the request target, set by HTTPChannel before gotLength
        target = getattr(self.channel, "_path", b"/")
        answer_and_close(self.channel, self.refuse_too_large(target.split(b"?", 1)[0]))

    def refuse_too_large(self, path: bytes) -> bytes:
        """The whole raw 413 response (status line, headers, body)."""
        raise NotImplementedError


def raw_response(status_line: bytes, body: bytes) -> bytes:
    """A whole JSON response that closes its connection, with the headers
    every admin answer carries (as ``lectr.admin.api.write_json`` sets them):
    ``status_line`` like ``b"413 Request Entity Too Large"``."""
    return (
        b"HTTP/1.1 "
        + status_line
        + b"\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
        + b"Cache-Control: no-store\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
