"""The admin port's twisted.web Site: request bodies are kept in memory and
capped (twisted.web would spool any size to a temporary file); a declared
``Content-Length`` over the cap is answered 413 before the body is read."""

from __future__ import annotations

import json
from io import BytesIO

from twisted.web.server import Request, Site

from lectr.admin.api import MAX_BODY_BYTES


class _Discard:
    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> None:
        pass

    def read(self, *args) -> bytes:
        return b""

    def tell(self) -> int:
        return 0


class AdminRequest(Request):
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
            self.content = _Discard()
            self._refuse()
            return
        self.content.write(data)

    def _refuse(self) -> None:
        self._refused = True
        limit = self.channel.site.max_body_bytes
        body = json.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": f"the request body is larger than {limit} bytes",
                }
            }
        ).encode()
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        Request.requestReceived(self, command, path, version)


class AdminSite(Site):
    noisy = False
    displayTracebacks = False
    requestFactory = AdminRequest

    def __init__(self, resource, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__(resource, timeout=120)
        self.max_body_bytes = max_body_bytes
