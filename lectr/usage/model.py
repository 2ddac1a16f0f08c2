"""The contract between the proxy and usage logging.

The proxy builds one :class:`UsageRecord` per request (success, error or
client disconnect) and hands it to ``UsageRecorder.record``, which must
return at once and never raise. Token counts come from a :class:`Meter` that
sees the response bytes as they pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lectr.pricing.cost import Priced

USAGE_SOURCES = ("provider", "estimated", "none")

#: the most characters of a provider's usage object a row keeps
RAW_USAGE_MAX = 4096
#: the largest token count a row keeps (int4 columns); a count past it is NULL
COUNT_MAX = 2**31 - 1

_SERVICE_TIER_RE = re.compile(r"[a-z0-9_-]{1,32}")


def service_tier_of(value: object) -> str | None:
    """A provider's reported service tier as a row keeps it: a string of 1 to
    32 characters of ``[a-z0-9_-]`` as it came (no case folding: a tier the
    price table does not name is priced at the base rates); anything else
    (another type, longer, other characters) is None. The one guard for the
    value, wherever it is read (the meters, the recorder's row check)."""
    if type(value) is str and _SERVICE_TIER_RE.fullmatch(value):
        return value
    return None


# Not frozen, for the reason UsageRecord is not (below): one or two are built
# per request on the hot path (1.3 µs each frozen, 0.35 µs not, 10 fields).
# Treat it as immutable all the same (dataclasses.replace); NO_USAGE and
# NOTHING_RELAYED are shared. (Hashed as the frozen class was - over the
# counts - so that it may stay a field's default.)
@dataclass(slots=True, unsafe_hash=True)
class Usage:
    """Token counts of one response, normalized across dialects:

    - ``prompt_tokens`` is every prompt token, those read from or written to
      the provider's cache included (OpenAI counts them so; Anthropic's
      ``input_tokens`` does not, and the meter adds them);
    - ``completion_tokens`` is every output token, reasoning included (a
      provider that reports reasoning outside its completion count has it
      added, see :func:`lectr.usage.meters.openai_usage`).

    ``raw`` and ``model`` are provenance, not counts: two usages with the
    same counts compare equal whatever they say.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the provider's cache
    cache_creation_tokens: int | None = None  # prompt tokens written to the cache (Anthropic)
    source: str = "none"  # provider | estimated | none
    reasoning_tokens: int | None = None  # of completion_tokens: the model's reasoning
    #: of cache_creation_tokens: those written with the 1-hour TTL (the rest: 5 minutes)
    cache_creation_1h_tokens: int | None = None
    #: the service tier the provider says served the request, as it reports it
    #: (OpenAI's top-level ``service_tier``: default, flex, priority, scale;
    #: Anthropic's ``usage.service_tier``: standard, priority, batch); only a
    #: value of 1-32 characters of ``[a-z0-9_-]``, else None. It picks the
    #: price entry's rates of that tier (lectr.pricing.cost)
    service_tier: str | None = None
    #: server-side web searches the provider ran and bills per search
    #: (Anthropic's ``usage.server_tool_use.web_search_requests``)
    web_search_requests: int | None = None
    #: the provider's usage object as received (compact JSON, at most RAW_USAGE_MAX characters)
    raw: str | None = field(default=None, compare=False)
    #: the model the provider says it served (the response's ``model``)
    model: str | None = field(default=None, compare=False)


NO_USAGE = Usage()
#: the usage of a request whose client went away after the request was sent
#: upstream but before any response arrived: the provider has the prompt, so
#: the row is priced (estimated) from the request's size, never as nothing
NOTHING_RELAYED = Usage(source="estimated")


# Not frozen: one is built per request on the proxy's hot path, and a frozen
# dataclass's __init__ costs 1.6 µs more (21 fields through
# object.__setattr__). Treat it as immutable all the same (dataclasses.replace).
@dataclass(slots=True)
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
    #: the request's cost in USD (None: unpriced, or not priced yet)
    cost_usd: Decimal | None = None
    #: how ``cost_usd`` was computed (lectr.pricing.cost.Priced); None: not
    #: priced yet, and the recorder prices the row before writing it
    pricing: Priced | None = None


class UsageSink(Protocol):
    def record(self, record: UsageRecord) -> None:
        """Queue one record. O(1), never raises, never blocks."""


class Meter(Protocol):
    """Sees a response body as it passes through the relay."""

    def feed(self, data: bytes) -> bytes:
        """Account for ``data`` and return the bytes to send to the client
        (``data`` itself unless something must be removed)."""

    def flush(self) -> bytes:
        """The bytes still held back when the answer has ended whole, to send
        before its end (a stream being stripped may hold the start of an
        event); b"" for most meters."""

    def finish(self, complete: bool = True) -> Usage:
        """The usage seen so far (called at the end, or on disconnect).
        ``complete``: the provider's answer ended as its framing said (False:
        it was cut, and what it reports is estimated from what arrived)."""
