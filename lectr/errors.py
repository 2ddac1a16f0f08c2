"""Errors that carry an HTTP status and a machine-readable code.

Managers raise these; the admin app turns them into
``{"error": {"code", "message"}}`` and logs them at info. Anything else is a
bug: a generic 500, with the traceback only in the log. Messages are shown to
API callers, so they never contain a secret.
"""

from __future__ import annotations


class LectrError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(LectrError):
    status = 400
    code = "bad_request"


class Unauthorized(LectrError):
    status = 401
    code = "unauthorized"


class Forbidden(LectrError):
    status = 403
    code = "forbidden"


class NotFound(LectrError):
    status = 404
    code = "not_found"


class Conflict(LectrError):
    status = 409
    code = "conflict"


class Unprocessable(LectrError):
    status = 422
    code = "unprocessable"


class UpstreamUnavailable(LectrError):
    status = 502
    code = "upstream_unavailable"


class ServiceUnavailable(LectrError):
    status = 503
    code = "service_unavailable"
