"""The contract between the proxy and usage logging.

The proxy builds one :class:`UsageRecord` per request (success, error or
client disconnect) and hands it to ``UsageRecorder.record``, which must
return at once and never raise. Token counts come from a :class:`Meter` that
sees the response bytes as they pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

USAGE_SOURCES = ("provider", "estimated", "none")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the provider's cache
    cache_creation_tokens: int | None = None  # prompt tokens written to the cache (Anthropic)
    source: str = "none"  # provider | estimated | none


NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    created_at: datetime  # when the request arrived (UTC, aware)
    org_id: str
    key_id: str | None
    provider: str
    model: str | None
    method: str
    path: str  # provider path without the query string, e.g. /v1/chat/completions
    status: int  # HTTP status sent to the client; 499 when the client went away
    latency_ms: float
    ttfb_ms: float | None  # to the first response byte sent to the client
    streamed: bool
    usage: Usage = NO_USAGE
    error_type: str | None = None
    # routing (DESIGN §9)
    route: str | None = None  # the route (virtual model) the request named
    provider_key_id: str | None = None  # the provider key of the last attempt
    attempts: int = 1  # upstream calls made (0: refused before any)
    fallbacks: tuple[dict, ...] = ()  # why each earlier attempt was abandoned
    request_bytes: int = 0  # size of the request body (prompt estimates)


class UsageSink(Protocol):
    def record(self, record: UsageRecord) -> None:
        """Queue one record. O(1), never raises, never blocks."""


class Meter(Protocol):
    """Sees a response body as it passes through the relay."""

    def feed(self, data: bytes) -> bytes:
        """Account for ``data`` and return the bytes to send to the client
        (``data`` itself unless something must be removed)."""

    def finish(self) -> Usage:
        """The usage seen so far (called at the end, or on disconnect)."""
