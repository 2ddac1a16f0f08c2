"""Reading the request log back (for the admin API): an org's recent
requests, newest first with keyset pagination, and its usage totals.

Every argument may arrive as query-string text: the manager validates and
converts it, and raises :class:`~lectr.errors.BadRequest` for anything
malformed (a malformed org id is :class:`~lectr.errors.NotFound`, as
everywhere). The answers are dataclasses of JSON types only (str, int,
float, bool, None, list), so ``dataclasses.asdict`` or ``to_json()`` is
all a resource needs.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from lectr.errors import BadRequest, NotFound
from lectr.pricing.cost import Line, breakdown, format_usd
from lectr.storage.request_logs import RequestFilter, RequestLog, RequestLogStore
from lectr.util.validate import parse_uuid

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: usage totals return at most this many groups (the busiest models first)
MAX_GROUPS = 1000
#: the longest range usage totals cover in one call
MAX_TOTALS_RANGE = timedelta(days=366)
GROUP_BY = ("model", "provider", "key", "day", "hour")
#: hourly totals cover at most this long a range (744 buckets)
MAX_HOURLY_RANGE = timedelta(days=31)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_STATUS_CLASS_RE = re.compile(r"([1-5])xx")
_CURSOR_RE = re.compile(r"(-?\d{1,18}):(\d{1,19})")
_LIVE_CURSOR_RE = re.compile(r"live:(\d{1,19})")
_MAX_ID = 2**63 - 1
#: a pg_snapshot's text: xmin:xmax:xip,... (the transactions in progress)
_SNAPSHOT_RE = re.compile(r"(\d{1,19}):(\d{1,19}):((?:\d{1,19}(?:,\d{1,19})*)?)")
_POSITION_RE = re.compile(r"(\d{1,19}):(\d{1,19})")
#: a snapshot with more transactions in progress keeps the oldest of them,
#: its xmax lowered to the next one (every transaction from there on counted
#: as unseen: their rows may come twice, which clients drop by request id,
#: never not at all)
MAX_SNAPSHOT_XIPS = 32


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RequestEntry:
    """One proxied request, as the admin API shows it."""

    request_id: str
    created_at: str  # ISO 8601, UTC ("…Z")
    key_id: str | None
    provider: str
    model: str | None
    method: str
    path: str
    status: int
    latency_ms: float
    ttfb_ms: float | None
    streamed: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    cache_creation_tokens: int | None
    usage_source: str  # provider | estimated | none
    error_type: str | None
    reasoning_tokens: int | None
    cache_creation_1h_tokens: int | None
    response_model: str | None  # the model the provider says it served
    cost_usd: str | None  # exact decimal; None: unpriced
    route: str | None = None  # the route the model named
    provider_key_id: str | None = None  # the provider key of the last attempt
    attempts: int = 1  # upstream calls (0: refused before any)
    fallbacks: list | None = None  # why each earlier attempt was abandoned
    service_tier: str | None = None  # the service tier the provider says served it
    web_search_requests: int | None = None  # server-side web searches it billed

    @classmethod
    def from_row(cls, row: RequestLog) -> RequestEntry:
        return cls(
            request_id=row.request_id,
            created_at=_iso(row.created_at),
            key_id=row.key_id,
            provider=row.provider,
            model=row.model,
            method=row.method,
            path=row.path,
            status=row.status,
            latency_ms=row.latency_ms,
            ttfb_ms=row.ttfb_ms,
            streamed=row.streamed,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.total_tokens,
            cached_tokens=row.cached_tokens,
            cache_creation_tokens=row.cache_creation_tokens,
            usage_source=row.usage_source,
            error_type=row.error_type,
            reasoning_tokens=row.reasoning_tokens,
            cache_creation_1h_tokens=row.cache_creation_1h_tokens,
            response_model=row.response_model,
            cost_usd=format_usd(row.cost_usd),
            route=row.route,
            provider_key_id=row.provider_key_id,
            attempts=row.attempts,
            fallbacks=row.fallbacks,
            service_tier=row.service_tier,
            web_search_requests=row.web_search_requests,
        )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CostExplanation:
    """One request, its tokens, the prices its cost was computed with
    (their date and source) and the arithmetic."""

    org_id: str
    request: RequestEntry
    usage_raw: str | None  # the provider's usage object, as received
    pricing: dict | None  # the stored basis: provider, model, source, checked, tier, rates
    lines: list[Line]
    total_usd: str | None  # the sum of the lines (None: unpriced)
    matches: bool | None  # the stored cost equals the sum of the lines
    estimated: bool  # the counts (and so the cost) are estimates
    note: str  # in words

    def to_json(self) -> dict:
        return {
            "request": self.request.to_json(),
            "usage_raw": self.usage_raw,
            "pricing": self.pricing,
            "lines": [line.to_json() for line in self.lines],
            "total_usd": self.total_usd,
            "matches": self.matches,
            "estimated": self.estimated,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class RequestPage:
    items: list[RequestEntry]
    next_cursor: str | None  # pass back as ``cursor`` for the next page; None: no more
    # pass back as ``after`` for the requests logged since this answer
    live_cursor: str | None = None

    def to_json(self) -> dict:
        return {
            "items": [i.to_json() for i in self.items],
            "next_cursor": self.next_cursor,
            "live_cursor": self.live_cursor,
        }


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Totals of one group over the range."""

    # the model (None: requests without one), the provider, the Lectr key id
    # (None: requests without one), "YYYY-MM-DD" (UTC) or the hour (ISO 8601, UTC)
    key: str | None
    requests: int
    errors: int  # status >= 400 (499: the client went away)
    unmetered: int  # requests whose usage is unknown (usage_source "none")
    estimated: int  # requests whose usage is estimated (a cut response)
    unpriced: int  # metered requests without a cost (a model with no price)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    cache_creation_tokens: int
    cache_creation_1h_tokens: int
    reasoning_tokens: int
    cache_hits: int  # requests with prompt tokens read from the provider's cache
    cache_hit_rate: float | None  # cached_tokens / prompt_tokens
    cost_usd: str  # exact decimal, the priced requests only

    def to_json(self) -> dict:
        return asdict(self)


# --- cursors ---------------------------------------------------------------------


def encode_cursor(created_at: datetime, row_id: int) -> str:
    """An opaque keyset position: the exact microsecond and the row id."""
    delta = created_at.astimezone(UTC) - _EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return base64.urlsafe_b64encode(f"{micros}:{row_id}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: object) -> tuple[datetime, int]:
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= 64:
        raise BadRequest("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadRequest("invalid cursor") from None
    m = _CURSOR_RE.fullmatch(raw)
    if m is None:
        raise BadRequest("invalid cursor")
    micros, row_id = int(m.group(1)), int(m.group(2))
    if not 0 < row_id <= _MAX_ID:
        raise BadRequest("invalid cursor")
    try:
        created_at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise BadRequest("invalid cursor") from None
    return created_at, row_id


# --- argument parsing ----------------------------------------------------------------


def parse_limit(value: object) -> int:
    """Page size, clamped to 1..MAX_LIMIT; None: the default."""
    if value is None or value == "":
        return DEFAULT_LIMIT
    if isinstance(value, bool):
        raise BadRequest("limit must be a whole number")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        n = int(value)
    else:
        raise BadRequest("limit must be a whole number")
    return min(max(n, 1), MAX_LIMIT)


def parse_time(value: object, what: str) -> datetime | None:
    """A datetime, or ISO 8601 text (``2025-01-31``, ``2025-01-31T12:00:00Z``,
    with an offset). A time without a zone is UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadRequest(
                f"{what} must be an ISO 8601 date or time, e.g. 2025-01-31T00:00:00Z"
            ) from None
    else:
        raise BadRequest(f"{what} must be an ISO 8601 date or time")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


def parse_status(value: object) -> tuple[int | None, int | None]:
    """A status filter: ``429``, ``"429"``, a class ``"4xx"``, or
    ``"error"`` (every status from 400). Returns (min, max), inclusive."""
    if value is None or value == "":
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        code = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "error":
            return 400, None
        m = _STATUS_CLASS_RE.fullmatch(text)
        if m:
            base = int(m.group(1)) * 100
            return base, base + 99
        if not re.fullmatch(r"\d{3}", text):
            raise BadRequest("status must be a status code (429), a class (4xx) or 'error'")
        code = int(text)
    else:
        raise BadRequest("status must be a status code (429), a class (4xx) or 'error'")
    if not 100 <= code <= 599:
        raise BadRequest("status must be from 100 to 599")
    return code, code


def parse_provider(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _PROVIDER_RE.fullmatch(value):
        raise BadRequest("provider must be a provider name such as openai or anthropic")
    return value


def parse_key_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    try:
        return parse_uuid(value, "key")
    except NotFound:
        raise BadRequest("key_id must be a Lectr key id (a UUID)") from None


@dataclass(frozen=True, slots=True)
class LiveCursor:
    """A live view's position. ``snapshot``: the PostgreSQL snapshot of the
    last answer; every row it could not see is new (rows are read in commit
    order, ``(txid, id)``). After a full page, ``after`` is the last row
    given and ``chain`` the snapshot of the chain's first full page: the
    pages go on past ``after``, and the answer that ends the chain goes on
    from ``chain`` (rows committed meanwhile behind ``after`` are then
    given; some twice). ``row_id``: a cursor of before migration 0009."""

    snapshot: str = ""
    chain: str | None = None
    after: tuple[int, int] | None = None
    row_id: int | None = None


def _kept_snapshot(snapshot: str) -> str:
    """A snapshot for a cursor: as it is, or with the oldest
    MAX_SNAPSHOT_XIPS transactions in progress and the next one as its xmax
    when more were: it then sees less, never more (see MAX_SNAPSHOT_XIPS)."""
    xmin, _, rest = snapshot.partition(":")
    xips = rest.partition(":")[2].split(",")
    if len(xips) <= MAX_SNAPSHOT_XIPS:
        return snapshot
    return f"{xmin}:{xips[MAX_SNAPSHOT_XIPS]}:{','.join(xips[:MAX_SNAPSHOT_XIPS])}"


def encode_live_cursor(cursor: LiveCursor) -> str:
    if cursor.row_id is not None:
        raw = f"live:{cursor.row_id}"
    else:
        parts = ["v2", _kept_snapshot(cursor.snapshot)]
        if cursor.after is not None:
            parts += [
                _kept_snapshot(cursor.chain or cursor.snapshot),
                f"{cursor.after[0]}:{cursor.after[1]}",
            ]
        raw = " ".join(parts)
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def _parse_snapshot(text: str) -> str:
    """A snapshot from a cursor, checked as PostgreSQL will read it (1 <=
    xmin <= xip < xmax, xips increasing, 63-bit), so that no cursor a
    client sends makes the query fail."""
    m = _SNAPSHOT_RE.fullmatch(text)
    if m is None:
        raise BadRequest("invalid after cursor")
    xmin, xmax = int(m.group(1)), int(m.group(2))
    xips = [int(x) for x in m.group(3).split(",")] if m.group(3) else []
    if not 1 <= xmin <= xmax <= _MAX_ID or len(xips) > MAX_SNAPSHOT_XIPS:
        raise BadRequest("invalid after cursor")
    previous = xmin - 1
    for x in xips:
        if not previous < x < xmax:
            raise BadRequest("invalid after cursor")
        previous = x
    return f"{xmin}:{xmax}:{','.join(map(str, xips))}"


def decode_live_cursor(cursor: object) -> LiveCursor:
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= 2048:
        raise BadRequest("invalid after cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadRequest("invalid after cursor") from None
    m = _LIVE_CURSOR_RE.fullmatch(raw)
    if m is not None:
        if int(m.group(1)) > _MAX_ID:
            raise BadRequest("invalid after cursor")
        return LiveCursor(row_id=int(m.group(1)))
    parts = raw.split(" ")
    if parts[0] != "v2" or len(parts) not in (2, 4):
        raise BadRequest("invalid after cursor")
    snapshot = _parse_snapshot(parts[1])
    if len(parts) == 2:
        return LiveCursor(snapshot)
    position = _POSITION_RE.fullmatch(parts[3])
    if position is None or max(int(position.group(1)), int(position.group(2))) > _MAX_ID:
        raise BadRequest("invalid after cursor")
    after = (int(position.group(1)), int(position.group(2)))
    return LiveCursor(snapshot, _parse_snapshot(parts[2]), after)


def parse_model(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise BadRequest("model must be a string of at most 256 characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadRequest("model must not contain control characters")
    return value


# --- the manager -----------------------------------------------------------------------


class UsageManager:
    def __init__(self, store: RequestLogStore) -> None:
        self._store = store

    async def recent_requests(
        self,
        org_id: object,
        *,
        limit: object = DEFAULT_LIMIT,
        cursor: object = None,
        after: object = None,
        provider: object = None,
        model: object = None,
        key_id: object = None,
        status: object = None,
        since: object = None,
        until: object = None,
    ) -> RequestPage:
        """An org's requests, newest first. ``cursor`` is the previous page's
        ``next_cursor``; filters narrow the listing (a page and its cursor
        must be read with the same filters).

        ``after`` (a previous answer's ``live_cursor``) asks instead for the
        requests stored since that answer, oldest first: a live view polls
        with it. Its answer's ``live_cursor`` continues from there (when the
        page is full, more are waiting)."""
        org = parse_uuid(org_id, "organization")
        n = parse_limit(limit)
        has_cursor = cursor not in (None, "")
        has_after = after not in (None, "")
        if has_cursor and has_after:
            raise BadRequest("give cursor (older requests) or after (newer ones), not both")
        status_min, status_max = parse_status(status)
        where = RequestFilter(
            provider=parse_provider(provider),
            model=parse_model(model),
            key_id=parse_key_id(key_id),
            status_min=status_min,
            status_max=status_max,
            since=parse_time(since, "since"),
            until=parse_time(until, "until"),
        )
        if where.since and where.until and where.since >= where.until:
            raise BadRequest("since must be earlier than until")
        if has_after:
            return await self._newer(org, decode_live_cursor(after), n, where)
        before = decode_cursor(cursor) if has_cursor else None
        # The snapshot first: a row committed between the two queries shows
        # up twice (the client drops repeats by request_id) rather than never.
        snapshot = await self._store.snapshot()
        rows = await self._store.recent(org, limit=n + 1, before=before, where=where)
        more = len(rows) > n
        rows = rows[:n]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
        return RequestPage(
            [RequestEntry.from_row(r) for r in rows],
            next_cursor,
            encode_live_cursor(LiveCursor(snapshot)),
        )

    async def _newer(
        self, org: str, cursor: LiveCursor, n: int, where: RequestFilter
    ) -> RequestPage:
        if cursor.row_id is not None:  # a cursor of before migration 0009
            rows, _, snapshot = await self._store.newer_than_id(
                org, after_id=cursor.row_id, limit=n, where=where
            )
            following = LiveCursor(row_id=rows[-1].id) if len(rows) == n else LiveCursor(snapshot)
        else:
            rows, positions, snapshot = await self._store.newer(
                org, unseen_by=cursor.snapshot, after=cursor.after, limit=n, where=where
            )
            if len(rows) == n:  # a full page: the chain goes on past it
                following = LiveCursor(cursor.snapshot, cursor.chain or snapshot, positions[-1])
            else:  # the chain ends: on from its first page's snapshot
                following = LiveCursor(cursor.chain or snapshot)
        return RequestPage(
            [RequestEntry.from_row(r) for r in rows], None, encode_live_cursor(following)
        )

    async def get_request(self, org_id: object, request_id: object) -> RequestEntry:
        """One request of an org (404 for another org's)."""
        org = parse_uuid(org_id, "organization")
        rid = parse_uuid(request_id, "request")
        detail = await self._store.get(rid)
        if detail is None or detail.row.org_id != org:
            raise NotFound("request not found")
        return RequestEntry.from_row(detail.row)

    async def org_totals(
        self, org_ids: list[str] | None, *, since: object, until: object
    ) -> UsageReport:
        """One total per org over the hours of ``[since, until)`` (``key``:
        the org id), for ``org_ids`` (None: every org); orgs without requests
        are left out. The range is rounded out to whole hours, as for
        :meth:`usage_totals`, and the report gives the range covered."""
        start, end = self._hours(since, until)
        if org_ids is not None:
            org_ids = [parse_uuid(o, "organization") for o in org_ids]
            if not org_ids:
                return UsageReport(start, end, "org", [])
        rows = await self._store.totals_by_org(org_ids, since=start, until=end)
        items = sorted((_total(r) for r in rows), key=lambda t: (-t.requests, t.key or ""))
        return UsageReport(start, end, "org", items)

    @staticmethod
    def _hours(since: object, until: object) -> tuple[datetime, datetime]:
        start = parse_time(since, "since")
        end = parse_time(until, "until")
        if start is None or end is None:
            raise BadRequest("since and until are required")
        if start >= end:
            raise BadRequest("since must be earlier than until")
        start, end = hour_floor(start), hour_ceil(end)
        if end - start > MAX_TOTALS_RANGE + timedelta(hours=2):
            raise BadRequest(f"the range may span at most {MAX_TOTALS_RANGE.days} days")
        return start, end

    async def usage_totals(
        self, org_id: object, *, since: object, until: object, group_by: object
    ) -> UsageReport:
        """Totals grouped by ``model``, ``provider``, ``key`` (the Lectr key),
        ``day`` (UTC) or ``hour``, read from the hourly rollups. The range
        covers whole hours: ``since`` is rounded down and ``until`` up to the
        hour, and the report says which range it covers. Models, providers
        and keys come busiest first (at most MAX_GROUPS); days and hours in
        order; groups without requests are left out."""
        org = parse_uuid(org_id, "organization")
        if group_by not in GROUP_BY:
            raise BadRequest("group_by must be one of: " + ", ".join(GROUP_BY))
        start, end = self._hours(since, until)
        if group_by == "hour" and end - start > MAX_HOURLY_RANGE:
            raise BadRequest(
                f"hourly totals cover at most {MAX_HOURLY_RANGE.days} days; group by day"
            )
        rows = await self._store.totals(
            org, since=start, until=end, group_by=group_by, limit=MAX_GROUPS
        )
        items = [_total(r) for r in rows]
        return UsageReport(start, end, str(group_by), items)

    async def explain(self, request_id: object) -> CostExplanation:
        """One request's tokens, the prices its cost was computed with and
        the arithmetic (the caller checks that it may see ``org_id``)."""
        rid = parse_uuid(request_id, "request")
        detail = await self._store.get(rid)
        if detail is None:
            raise NotFound("request not found")
        row, basis = detail.row, detail.basis
        entry = RequestEntry.from_row(row)
        estimated = row.usage_source == "estimated"
        if basis is None:
            note = (
                "no usage was reported, so there is nothing to price"
                if row.usage_source == "none"
                else f"unpriced: no price for {row.response_model or row.model or 'this model'} "
                f"on {row.provider} when it was recorded (add one: lectr pricing set)"
            )
            return CostExplanation(
                row.org_id, entry, row.usage_raw, None, [], None, None, estimated, note
            )
        rates = {k: Decimal(v) for k, v in basis["rates"].items()}
        lines, total = breakdown(
            rates,
            prompt_tokens=row.prompt_tokens or 0,
            cached_tokens=row.cached_tokens or 0,
            cache_creation_tokens=row.cache_creation_tokens or 0,
            cache_creation_1h_tokens=row.cache_creation_1h_tokens or 0,
            completion_tokens=row.completion_tokens or 0,
            web_search_requests=row.web_search_requests or 0,
        )
        matches = row.cost_usd is not None and total == row.cost_usd
        service = basis.get("service_tier")
        whose = f"the {service} tier's" if service else "the"
        if basis.get("tier") == "long_context":
            tier = f"{whose} long-context rates (prompt over {basis['threshold']:,} tokens)"
        else:
            tier = f"{whose} rates" if service else "the base rates"
        if "web_search" in basis["rates"] and row.web_search_requests:
            tier += ", web searches per 1,000"
        note = (
            f"priced as {basis['provider']}/{basis['model']} ({basis['source']} price, "
            f"checked {basis['checked']}), {tier}"
        )
        if estimated:
            note += "; the counts are estimates (the response was cut short)"
        return CostExplanation(
            row.org_id,
            entry,
            row.usage_raw,
            basis,
            lines,
            format_usd(total),
            matches,
            estimated,
            note,
        )


def hour_floor(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_ceil(dt: datetime) -> datetime:
    floor = hour_floor(dt)
    return floor if floor == dt else floor + timedelta(hours=1)


def _group_key(key: object) -> str | None:
    if isinstance(key, datetime):
        return _iso(key).replace(".000000Z", "Z")
    if isinstance(key, date):
        return key.isoformat()
    return None if key is None else str(key)


def _total(r) -> UsageTotal:
    return UsageTotal(
        key=_group_key(r.key),
        requests=r.requests,
        errors=r.errors,
        unmetered=r.unmetered,
        estimated=r.estimated,
        unpriced=r.unpriced,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        total_tokens=r.total_tokens,
        cached_tokens=r.cached_tokens,
        cache_creation_tokens=r.cache_creation_tokens,
        cache_creation_1h_tokens=r.cache_creation_1h_tokens,
        reasoning_tokens=r.reasoning_tokens,
        cache_hits=r.cache_hits,
        cache_hit_rate=round(r.cached_tokens / r.prompt_tokens, 6) if r.prompt_tokens else None,
        cost_usd=format_usd(r.cost_usd) or "0",
    )


@dataclass(frozen=True, slots=True)
class UsageReport:
    since: datetime  # the range covered: whole hours
    until: datetime
    group_by: str
    items: list[UsageTotal]
