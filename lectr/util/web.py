"""twisted.web pieces shared by the proxy and admin ports."""

from __future__ import annotations

from io import BytesIO


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
        self.channel.transport.write(self.refuse_too_large(target.split(b"?", 1)[0]))
        self.channel.loseConnection()

    def refuse_too_large(self, path: bytes) -> bytes:
        """The whole raw 413 response (status line, headers, body)."""
        raise NotImplementedError


def raw_413(body: bytes, *extra_headers: bytes) -> bytes:
    head = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
    for h in extra_headers:
        head += h + b"\r\n"
    return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
