"""The admin port's twisted.web Site: request bodies are kept in memory and
capped (twisted.web would spool any size to a temporary file); a declared
``Content-Length`` over the cap is answered 413 before the body is read."""

from __future__ import annotations

import json

from twisted.web.server import Request, Site

from lectr.admin.api import MAX_BODY_BYTES
from lectr.util.web import CappedBodyRequest, raw_413


class AdminRequest(CappedBodyRequest, Request):
    def refuse_too_large(self, path: bytes) -> bytes:
        limit = self.channel.site.max_body_bytes
        body = json.dumps(
            {
                "error": {
                    "code": "payload_too_large",
                    "message": f"the request body is larger than {limit} bytes",
                }
            }
        ).encode()
        return raw_413(body, b"Cache-Control: no-store")

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
