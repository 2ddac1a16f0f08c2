"""request_logs against the real PostgreSQL: batched inserts, keyset
pagination, filters, totals, input validation, indexes and query plans."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.errors import BadRequest, NotFound
from lectr.managers.usage import (
    MAX_LIMIT,
    UsageManager,
    decode_cursor,
    decode_live_cursor,
    encode_cursor,
)
from lectr.storage.request_logs import (
    ROLLUPS_FROM_ROWS_SQL,
    RequestFilter,
    RequestLogStore,
    newer_sql,
)
from lectr.usage.model import Usage, UsageRecord

ORG = "00000000-0000-4000-8000-0000000000a1"
OTHER_ORG = "00000000-0000-4000-8000-0000000000b2"
T0 = datetime(2025, 3, 10, 12, 0, 0, tzinfo=UTC)


def rec(
    *,
    at: datetime = T0,
    org: str = ORG,
    provider: str = "openai",
    model: str | None = "gpt-4o-mini",
    status: int = 200,
    usage: Usage | None = None,
    **kw,
) -> UsageRecord:
    fields = dict(
        request_id=str(uuid.uuid4()),
        created_at=at,
        org_id=org,
        key_id=str(uuid.uuid4()),
        provider=provider,
        model=model,
        method="POST",
        path="/v1/chat/completions",
        status=status,
        latency_ms=120.5,
        ttfb_ms=30.25,
        streamed=False,
        usage=usage if usage is not None else Usage(10, 5, 15, 2, None, "provider"),
        error_type=None,
    )
    fields.update(kw)
    return UsageRecord(**fields)


@pytest.fixture
def store(database) -> RequestLogStore:
    return RequestLogStore(database)


@pytest.fixture
def manager(store) -> UsageManager:
    return UsageManager(store)


def raw_rows(db_url: str, sql: str, args=None) -> list[tuple]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


# --- writes ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_insert_round_trips_every_field(store, db_url):
    full = rec(
        usage=Usage(100, 20, 120, 60, 7, "provider"),
        streamed=True,
        error_type=None,
        ttfb_ms=None,
    )
    sparse = rec(
        key_id=None,
        model=None,
        status=499,
        usage=Usage(),
        error_type="client_disconnected",
        method="GET",
        path="/v1/models",
        latency_ms=0.0,
    )
    assert await store.insert([full, sparse]) == 2
    rows = {r.request_id: r for r in await store.recent(ORG, limit=10)}
    for r in (full, sparse):
        got = rows[r.request_id]
        assert got.created_at == r.created_at
        assert (got.org_id, got.key_id, got.provider, got.model) == (
            r.org_id,
            r.key_id,
            r.provider,
            r.model,
        )
        assert (got.method, got.path, got.status, got.streamed) == (
            r.method,
            r.path,
            r.status,
            r.streamed,
        )
        assert (got.latency_ms, got.ttfb_ms, got.error_type) == (
            r.latency_ms,
            r.ttfb_ms,
            r.error_type,
        )
        assert (
            Usage(
                got.prompt_tokens,
                got.completion_tokens,
                got.total_tokens,
                got.cached_tokens,
                got.cache_creation_tokens,
                got.usage_source,
            )
            == r.usage
        )


@pytest_twisted.ensureDeferred
async def test_insert_skips_request_ids_already_stored(store):
    batch = [rec() for _ in range(5)]
    assert await store.insert(batch) == 5
    again = batch[2:] + [rec()]
    assert await store.insert(again) == 1
    assert await store.count(ORG) == 6
    assert await store.insert([]) == 0


@pytest_twisted.ensureDeferred
async def test_awkward_strings_survive_the_array_encoding(store):
    models = [
        'quote"d',
        "back\\slash",
        "a,b",
        "{braces}",
        "NULL",
        "",
        "  spaced  ",
        "ünïcødé ✓ 模型",
        "new\nline",
        '\\"',
    ]
    batch = [rec(model=m, at=T0 + timedelta(seconds=i)) for i, m in enumerate(models)]
    assert await store.insert(batch) == len(batch)
    got = {r.request_id: r.model for r in await store.recent(ORG, limit=50)}
    assert got == {r.request_id: r.model for r in batch}


@pytest_twisted.ensureDeferred
async def test_bad_rows_fail_their_batch_without_writing_any_of_it(store):
    good = rec()
    with pytest.raises(ValueError):  # refused by the driver before sending
        await store.insert([good, rec(model="nul\x00byte")])
    with pytest.raises(psycopg2.DataError):
        await store.insert([good, rec(org="not-a-uuid")])
    with pytest.raises(psycopg2.DataError):
        await store.insert([good, rec(status=70000)])
    with pytest.raises(psycopg2.DataError):
        await store.insert([good, rec(usage=Usage(2**40, 1, 1, None, None, "provider"))])
    with pytest.raises(psycopg2.IntegrityError):
        await store.insert([good, rec(usage=Usage(source="guessed"))])
    assert await store.count() == 0
    assert await store.insert([good]) == 1


# --- listing -------------------------------------------------------------------------


async def seed(store, n: int, **kw) -> list[UsageRecord]:
    batch = [rec(at=T0 + timedelta(minutes=i), **kw) for i in range(n)]
    await store.insert(batch)
    return batch


@pytest_twisted.ensureDeferred
async def test_recent_is_newest_first_and_pages_cover_everything_once(store, manager):
    rows = await seed(store, 23)
    # rows sharing one timestamp are ordered by id
    same = [rec(at=T0 + timedelta(minutes=5)) for _ in range(4)]
    await store.insert(same)
    await seed(store, 3, org=OTHER_ORG)

    seen, cursor, pages = [], None, 0
    while True:
        page = await manager.recent_requests(ORG, limit="5", cursor=cursor)
        pages += 1
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # rows arriving meanwhile (newer) do not disturb the pages that follow
        await store.insert([rec(at=T0 + timedelta(days=1, seconds=pages))])
    assert pages == 6
    ids = [e.request_id for e in seen]
    assert len(ids) == len(set(ids)) == 27
    assert set(ids) == {r.request_id for r in rows + same}
    stamps = [e.created_at for e in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert seen[0].created_at == "2025-03-10T12:22:00.000000Z"


@pytest_twisted.ensureDeferred
async def test_last_page_exactly_full_has_no_cursor(manager, store):
    await seed(store, 10)
    first = await manager.recent_requests(ORG, limit=5)
    assert first.next_cursor is not None
    second = await manager.recent_requests(ORG, limit=5, cursor=first.next_cursor)
    assert len(second.items) == 5
    assert second.next_cursor is None
    empty = await manager.recent_requests(OTHER_ORG)
    assert (empty.items, empty.next_cursor) == ([], None)
    # the live cursor is there all the same: where a live view starts
    start = decode_live_cursor(empty.live_cursor)
    assert start.snapshot and start.row_id is None
    assert (await manager.recent_requests(OTHER_ORG, after=empty.live_cursor)).items == []
    [late] = await seed(store, 1, org=OTHER_ORG)
    newer = await manager.recent_requests(OTHER_ORG, after=empty.live_cursor)
    assert [e.request_id for e in newer.items] == [late.request_id]


@pytest_twisted.ensureDeferred
async def test_a_cursor_of_before_0009_is_answered_once_then_a_snapshot_goes_on(
    manager, store, monkeypatch
):
    import base64

    from lectr.managers.usage import LiveCursor
    from lectr.storage import request_logs

    # (a batch is stored in request-id order: its ids follow the sorted ids)
    first = sorted(r.request_id for r in await seed(store, 3))
    [(top,)] = await store._db.runQuery("max_id", "SELECT max(id) FROM request_logs")
    old = base64.urlsafe_b64encode(f"live:{top - 2}".encode()).decode()
    page = await manager.recent_requests(ORG, after=old)
    assert [e.request_id for e in page.items] == first[1:]
    assert decode_live_cursor(page.live_cursor).row_id is None  # a snapshot from here on
    later = await seed(store, 1)
    page = await manager.recent_requests(ORG, after=page.live_cursor)
    assert [e.request_id for e in page.items] == [later[0].request_id]
    # a full page goes on by id; a cursor far behind (or forged) reads a window, not the table
    page = await manager.recent_requests(ORG, after=old, limit=1)
    assert decode_live_cursor(page.live_cursor) == LiveCursor(row_id=top - 1)
    monkeypatch.setattr(request_logs, "LEGACY_CURSOR_WINDOW", 1)
    page = await manager.recent_requests(ORG, after=old)
    assert [e.request_id for e in page.items] == [first[1]]
    top_cursor = base64.urlsafe_b64encode(f"live:{2**63 - 1}".encode()).decode()
    assert (await manager.recent_requests(ORG, after=top_cursor)).items == []


class Writer:
    """A connection of its own whose transaction stays open until told."""

    def __init__(self, db_url: str) -> None:
        self.conn = psycopg2.connect(db_url)
        self.pending: list[str] = []

    def insert(self, n: int) -> None:
        with self.conn.cursor() as cur:
            for _ in range(n):
                rid = str(uuid.uuid4())
                cur.execute(
                    "INSERT INTO request_logs (request_id, created_at, org_id, provider, "
                    "method, path, status, latency_ms) VALUES (%s, %s, %s, 'openai', 'POST', "
                    "'/v1/chat/completions', 200, 1.0)",
                    (rid, T0, ORG),
                )
                self.pending.append(rid)

    def end(self, commit: bool) -> list[str]:
        (self.conn.commit if commit else self.conn.rollback)()
        done, self.pending = self.pending, []
        return done if commit else []


async def poll(manager, cursor: str, page: int, seen: list[str]) -> tuple[str, int]:
    """One poll of a live view: its next cursor and how many rows came."""
    got = await manager.recent_requests(ORG, after=cursor, limit=page)
    seen.extend(e.request_id for e in got.items)
    return got.live_cursor, len(got.items)


@pytest.mark.parametrize("page", [200, 2], ids=["pages", "chains of full pages"])
@pytest_twisted.ensureDeferred
async def test_a_live_view_gets_every_committed_row_whatever_the_commit_order(
    manager, db_url, page
):
    """Three writers insert, commit and roll back in a random order while a
    live view polls: every committed row reaches the view (exactly once
    when no page is full), a rolled-back one never does - however late a
    transaction commits after newer ones."""
    import random

    for seed_ in range(6):
        rng = random.Random(seed_)
        writers = [Writer(db_url) for _ in range(3)]
        try:
            cursor = (await manager.recent_requests(ORG, limit=1)).live_cursor
            committed: set[str] = set()
            rolled_back: set[str] = set()
            seen: list[str] = []

            for _ in range(40):
                w = rng.choice(writers)
                op = rng.random()
                if op < 0.4:
                    w.insert(rng.randint(1, 3))
                elif op < 0.6:
                    committed.update(w.end(commit=True))
                elif op < 0.65:
                    pending = list(w.pending)
                    w.end(commit=False)
                    rolled_back.update(pending)
                else:
                    cursor, _ = await poll(manager, cursor, page, seen)
            for w in writers:
                committed.update(w.end(commit=True))
            for _ in range(100):  # until a page that is not full
                cursor, n = await poll(manager, cursor, page, seen)
                if n < page:
                    break
            cursor, n = await poll(manager, cursor, page, seen)
            while n == page:  # (the end of a chain goes on from its first page)
                cursor, n = await poll(manager, cursor, page, seen)
            assert set(seen) == committed, f"seed {seed_}"
            assert not rolled_back & set(seen)
            if page == 200:
                assert len(seen) == len(set(seen)), f"seed {seed_}"
        finally:
            for w in writers:
                w.conn.close()


@pytest_twisted.ensureDeferred
async def test_filters(manager, store):
    await store.insert(
        [
            rec(at=T0, provider="anthropic", model="claude-3-5-haiku"),
            rec(at=T0 + timedelta(hours=1), status=429),
            rec(at=T0 + timedelta(hours=2), status=500, model="gpt-4o"),
            rec(at=T0 + timedelta(hours=3), status=499, model="gpt-4o"),
            rec(at=T0 + timedelta(hours=4)),
            rec(at=T0 + timedelta(hours=5), org=OTHER_ORG, status=500),
        ]
    )

    async def statuses(**kw) -> list[int]:
        page = await manager.recent_requests(ORG, **kw)
        return [e.status for e in page.items]

    assert await statuses() == [200, 499, 500, 429, 200]
    assert await statuses(provider="anthropic") == [200]
    assert await statuses(model="gpt-4o") == [499, 500]
    assert await statuses(status=429) == [429]
    assert await statuses(status="500") == [500]
    assert await statuses(status="4xx") == [499, 429]
    assert await statuses(status="error") == [499, 500, 429]
    assert await statuses(status="2xx", provider="openai") == [200]
    assert await statuses(since="2025-03-10T13:00:00Z", until="2025-03-10T15:00:00+00:00") == [
        500,
        429,
    ]
    assert await statuses(since=T0 + timedelta(hours=3)) == [200, 499]
    assert await statuses(until="2025-03-10") == []
    assert await statuses(model="gpt-4o", status="5xx", since="2025-03-10T12:00") == [500]


@pytest_twisted.ensureDeferred
async def test_entries_are_json_ready(manager, store):
    await store.insert([rec(usage=Usage(3, 4, 7, None, None, "estimated"), streamed=True)])
    page = await manager.recent_requests(ORG)
    doc = json.loads(json.dumps(page.to_json()))
    [item] = doc["items"]
    assert doc["next_cursor"] is None
    assert item["usage_source"] == "estimated"
    assert item["prompt_tokens"] == 3 and item["cached_tokens"] is None
    assert item["streamed"] is True
    assert item["created_at"] == "2025-03-10T12:00:00.000000Z"
    assert set(item) == {
        "request_id",
        "created_at",
        "key_id",
        "provider",
        "model",
        "method",
        "path",
        "status",
        "latency_ms",
        "ttfb_ms",
        "streamed",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "cache_creation_tokens",
        "usage_source",
        "error_type",
        "route",
        "provider_key_id",
        "attempts",
        "fallbacks",
        "reasoning_tokens",
        "cache_creation_1h_tokens",
        "response_model",
        "cost_usd",
        "service_tier",
        "web_search_requests",
    }
    assert item["service_tier"] is None and item["web_search_requests"] is None


@pytest_twisted.ensureDeferred
async def test_a_rows_service_tier_and_web_searches_are_stored_and_listed(manager, store):
    usage = Usage(3, 4, 7, source="provider", service_tier="flex", web_search_requests=2)
    await store.insert([rec(usage=usage)])
    [item] = (await manager.recent_requests(ORG)).to_json()["items"]
    assert item["service_tier"] == "flex" and item["web_search_requests"] == 2
    detail = await store.get(item["request_id"])
    assert detail.row.service_tier == "flex" and detail.row.web_search_requests == 2


@pytest_twisted.ensureDeferred
async def test_limits_are_clamped(manager, store):
    await seed(store, MAX_LIMIT + 5)
    assert len((await manager.recent_requests(ORG, limit=0)).items) == 1
    assert len((await manager.recent_requests(ORG, limit="-3")).items) == 1
    assert len((await manager.recent_requests(ORG, limit=10_000)).items) == MAX_LIMIT
    assert len((await manager.recent_requests(ORG, limit=None)).items) == 50


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cursor": "not base64!"},
        {"cursor": encode_cursor(T0, 1)[:-2] + "@@"},
        {"cursor": "MTIzNA"},  # "1234": no id
        {"cursor": "eDp5"},  # "x:y"
        {"cursor": "MTow"},  # "1:0": ids start at 1
        {"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OjE"},  # out of any datetime
        {"cursor": 12},
        {"cursor": "A" * 100},
        {"limit": "ten"},
        {"limit": 2.5},
        {"limit": True},
        {"status": "4x"},
        {"status": "600"},
        {"status": 99},
        {"status": "oops"},
        {"status": 4.0},
        {"provider": "Open AI"},
        {"provider": "x" * 65},
        {"provider": 3},
        {"model": "m" * 257},
        {"model": "nul\x00"},
        {"model": ["a"]},
        {"since": "yesterday"},
        {"since": "2025-13-01"},
        {"until": 1234},
        {"since": "2025-03-02", "until": "2025-03-01"},
        {"since": "2025-03-01", "until": "2025-03-01"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_arguments_are_bad_requests(manager, kwargs):
    with pytest.raises(BadRequest):
        await manager.recent_requests(ORG, **kwargs)


@pytest_twisted.ensureDeferred
async def test_malformed_org_is_not_found(manager):
    with pytest.raises(NotFound):
        await manager.recent_requests("nope")
    with pytest.raises(NotFound):
        await manager.usage_totals("'; DROP TABLE x", since=T0, until=T0, group_by="model")


def test_cursor_round_trip_is_exact():
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert decode_cursor(encode_cursor(at, 42)) == (at, 42)
    before_epoch = datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)
    assert decode_cursor(encode_cursor(before_epoch, 2**63 - 1)) == (before_epoch, 2**63 - 1)


# --- totals --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_totals_by_model_provider_and_day(manager, store):
    day1 = datetime(2025, 3, 10, 23, 59, 59, 999999, tzinfo=UTC)
    day2 = datetime(2025, 3, 11, 0, 0, tzinfo=UTC)
    await store.insert(
        [
            rec(at=day1, model="gpt-4o", usage=Usage(10, 5, 15, 4, None, "provider")),
            rec(at=day2, model="gpt-4o", usage=Usage(20, 10, 30, None, None, "provider")),
            rec(at=day2, model="gpt-4o", status=500, usage=Usage()),
            rec(
                at=day2,
                provider="anthropic",
                model="claude",
                usage=Usage(100, 7, 107, 50, 30, "provider"),
            ),
            rec(
                at=day2, model=None, status=499, usage=Usage(None, 3, None, None, None, "estimated")
            ),
            # outside the range, or another org
            rec(at=datetime(2025, 3, 12, tzinfo=UTC), model="gpt-4o"),
            rec(at=datetime(2025, 3, 9, 23, 59, tzinfo=UTC), model="gpt-4o"),
            rec(at=day2, org=OTHER_ORG, model="gpt-4o"),
        ]
    )
    since, until = "2025-03-10", "2025-03-12"

    by_model = (await manager.usage_totals(ORG, since=since, until=until, group_by="model")).items
    assert [(t.key, t.requests) for t in by_model] == [("gpt-4o", 3), ("claude", 1), (None, 1)]
    gpt = by_model[0]
    assert (gpt.errors, gpt.unmetered) == (1, 1)
    assert (gpt.prompt_tokens, gpt.completion_tokens, gpt.total_tokens) == (30, 15, 45)
    assert (gpt.cached_tokens, gpt.cache_creation_tokens) == (4, 0)
    assert by_model[1].cache_creation_tokens == 30
    assert by_model[2].errors == 1 and by_model[2].completion_tokens == 3

    by_provider = (
        await manager.usage_totals(ORG, since=since, until=until, group_by="provider")
    ).items
    assert [(t.key, t.requests, t.prompt_tokens) for t in by_provider] == [
        ("openai", 4, 30),
        ("anthropic", 1, 100),
    ]

    by_day = (await manager.usage_totals(ORG, since=since, until=until, group_by="day")).items
    assert [(t.key, t.requests, t.total_tokens) for t in by_day] == [
        ("2025-03-10", 1, 15),
        ("2025-03-11", 4, 137),
    ]
    assert json.loads(json.dumps([t.to_json() for t in by_day]))[0]["key"] == "2025-03-10"

    # the range is [since, until), in whole hours: 23:59:59.999999 is in the hour 23:00
    just = await manager.usage_totals(ORG, since=day1, until=day2, group_by="provider")
    assert (just.since, just.until) == (day2 - timedelta(hours=1), day2)
    assert [(t.key, t.requests) for t in just.items] == [("openai", 1)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"since": None, "until": "2025-03-01", "group_by": "model"},
        {"since": "2025-03-01", "until": None, "group_by": "model"},
        {"since": "2025-03-02", "until": "2025-03-01", "group_by": "day"},
        {"since": "2024-01-01", "until": "2025-03-01", "group_by": "day"},
        {"since": "2025-03-01", "until": "2025-03-02", "group_by": "key_id"},
        {"since": "2025-03-01", "until": "2025-03-02", "group_by": "model; DROP TABLE x"},
        {"since": "soon", "until": "2025-03-02", "group_by": "day"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_totals_arguments(manager, kwargs):
    with pytest.raises(BadRequest):
        await manager.usage_totals(ORG, **kwargs)


# --- indexes and plans -----------------------------------------------------------------


def test_read_back_indexes_exist_as_designed(db_url):
    defs = dict(
        raw_rows(
            db_url,
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'request_logs'",
        )
    )
    # (no INCLUDE since 0006: the totals read the rollups)
    assert defs["request_logs_org_created_idx"].endswith("(org_id, created_at DESC, id DESC)")
    assert "(org_id, model, created_at DESC, id DESC)" in defs["request_logs_org_model_idx"]
    assert defs["request_logs_org_errors_idx"].endswith(
        "(org_id, created_at DESC, id DESC) WHERE (status >= 400)"
    )
    stats = raw_rows(db_url, "SELECT stxname FROM pg_statistic_ext")
    assert ("request_logs_day_stats",) in stats


def daily_partitions(db_url: str, first: datetime, days: int) -> None:
    """Partitions of one day each from ``first`` (00:00 UTC), as the
    partition job makes them."""
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            start = first.replace(hour=0, minute=0, second=0, microsecond=0)
            for _ in range(days):
                end = start + timedelta(days=1)
                cur.execute(
                    f"CREATE TABLE request_logs_p{start:%Y%m%d} PARTITION OF request_logs "
                    "FOR VALUES FROM (%s) TO (%s)",
                    (start, end),
                )
                start = end
    finally:
        conn.close()


@pytest.fixture
def big_table(db_url):
    """200k rows over 60 days (one partition a day), 20 orgs (ORG has a
    tenth of them), a rare model and rare errors; analyzed and vacuumed as
    autovacuum would."""
    daily_partitions(db_url, T0 - timedelta(days=61), 62)
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO request_logs (request_id, created_at, org_id, provider, model,
                    method, path, status, latency_ms, streamed, prompt_tokens,
                    completion_tokens, total_tokens, usage_source)
                SELECT gen_random_uuid(),
                       %s::timestamptz - (g %% 86400) * interval '1 minute',
                       CASE WHEN g %% 10 = 0 THEN %s::uuid
                            ELSE ('00000000-0000-4000-8000-0000000000'
                                  || lpad((g %% 19)::text, 2, '0'))::uuid END,
                       CASE WHEN g %% 50 = 0 THEN 'anthropic' ELSE 'openai' END,
                       CASE WHEN g %% 997 = 0 THEN 'gpt-rare' ELSE 'gpt-4o-mini' END,
                       'POST', '/v1/chat/completions',
                       CASE WHEN g %% 499 = 0 THEN 500 ELSE 200 END,
                       50, false, 10, 5, 15, 'provider'
                FROM generate_series(1, 200000) g
                """,
                (T0, ORG),
            )
            cur.execute(ROLLUPS_FROM_ROWS_SQL)
            cur.execute("VACUUM ANALYZE request_logs")
            cur.execute("VACUUM ANALYZE usage_hourly")
    finally:
        conn.close()
    return db_url


def explain(db_url: str, sql: str, args) -> str:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN " + sql, args)
            return "\n".join(r[0] for r in cur.fetchall())
    finally:
        conn.close()


def as_parent_indexes(db_url: str, plan: str) -> str:
    """The plan with each partition's index named after the partitioned
    index it belongs to (PostgreSQL names them per partition)."""
    for child, parent in raw_rows(
        db_url,
        "SELECT c.relname, p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relkind = 'I'",
    ):
        plan = plan.replace(f" using {child} ", f" using {parent} ")
    return plan


def empty_partitions(db_url: str) -> set[str]:
    full = {
        r[0] for r in raw_rows(db_url, "SELECT DISTINCT tableoid::regclass::text FROM request_logs")
    }
    every = {
        r[0]
        for r in raw_rows(
            db_url,
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'request_logs'::regclass",
        )
    }
    return every - full


def test_query_plans_at_scale(big_table):
    """The listing and totals queries use the indexes meant for them: no
    sequential scan, no sort of an org's rows (the planner may still sort the
    few rows a selective index returns)."""
    captured = []

    class Capture:
        async def runQuery(self, desc, sql, args=None):
            captured.append((sql, args))
            return []

    spy = RequestLogStore(Capture())

    def run(coro):
        with pytest.raises(StopIteration):  # nothing to wait for: one step
            coro.send(None)

    cursor_pos = (T0 - timedelta(days=20), 10**9)
    run(spy.recent(ORG, limit=51))
    run(spy.recent(ORG, limit=51, before=cursor_pos))
    run(spy.recent(ORG, limit=51, where=RequestFilter(model="gpt-rare")))
    run(spy.recent(ORG, limit=51, where=RequestFilter(status_min=500, status_max=599)))
    run(spy.recent(ORG, limit=51, before=cursor_pos, where=RequestFilter(status_min=400)))
    for group_by in ("model", "provider", "key", "day", "hour"):
        run(
            spy.totals(
                ORG,
                since=T0 - timedelta(days=30),
                until=T0,
                group_by=group_by,
                limit=1000,
            )
        )
    # a live view's poll: from the snapshot's xmin, after a position, with a filter
    [(snapshot,)] = raw_rows(big_table, "SELECT pg_current_snapshot()::text")
    captured.append(newer_sql(ORG, snapshot, None, 200, RequestFilter()))
    captured.append(newer_sql(ORG, snapshot, (10**6, 10**9), 200, RequestFilter(provider="openai")))
    plans = [as_parent_indexes(big_table, explain(big_table, sql, args)) for sql, args in captured]
    for plan in plans[-2:]:
        # the org's rows from the snapshot's xmin on, and no others (the
        # planner may sort those few across the partitions)
        assert "request_logs_live_idx" in plan, plan
    empty = empty_partitions(big_table)
    for plan in plans:
        for line in plan.splitlines():
            if "Seq Scan on " in line:  # only on partitions with no rows
                assert line.split("Seq Scan on ")[1].split()[0] in empty, plan
    for plan in plans[:2]:
        # rows come off each partition's index in order and are merged: no Sort node
        assert "->  Sort" not in plan and not plan.startswith("Sort"), plan
    assert "request_logs_org_created_idx" in plans[0]
    assert "request_logs_org_created_idx" in plans[1]
    assert "request_logs_org_model_idx" in plans[2]
    assert "request_logs_org_errors_idx" in plans[3]
    assert "request_logs_org_errors_idx" in plans[4]
    for plan in plans[5:-2]:
        # totals come from the hourly rollups, never from the rows
        assert "usage_hourly_pkey" in plan, plan
        assert "request_logs" not in plan, plan


def scanned_partitions(plan: str) -> set[str]:
    return {
        word
        for line in plan.splitlines()
        for word in line.replace("(", " ").split()
        if word.startswith("request_logs_p") or word == "request_logs_default"
    } - {w for w in plan.split() if w.endswith("_idx")}


def test_a_one_day_query_reads_one_partition(big_table):
    """Partition pruning: the listing of one day touches that day's
    partition only (not the other 61, not the default partition); its
    totals read the hourly rollups, no partition at all."""
    day = (T0 - timedelta(days=5)).replace(hour=0, minute=0)
    captured = []

    class Capture:
        async def runQuery(self, desc, sql, args=None):
            captured.append((sql, args))
            return []

    spy = RequestLogStore(Capture())
    for coro in (
        spy.totals(ORG, since=day, until=day + timedelta(days=1), group_by="model", limit=100),
        spy.recent(
            ORG,
            limit=51,
            where=RequestFilter(since=day, until=day + timedelta(days=1)),
        ),
    ):
        with pytest.raises(StopIteration):
            coro.send(None)
    (totals_sql, totals_args), (listing_sql, listing_args) = captured
    plan = explain(big_table, totals_sql, totals_args)
    assert "usage_hourly" in plan and "request_logs" not in plan, plan
    plan = explain(big_table, listing_sql, listing_args)
    assert scanned_partitions(plan) == {f"request_logs_p{day:%Y%m%d}"}, plan


@pytest_twisted.ensureDeferred
async def test_keyset_pages_cross_partitions(big_table, database):
    """Paging through three days (three partitions) returns every row once,
    newest first, whatever the page size."""
    store = RequestLogStore(database)
    since = (T0 - timedelta(days=8)).replace(hour=0)
    until = since + timedelta(days=3)
    expected = raw_rows(
        big_table,
        "SELECT id FROM request_logs WHERE org_id = %s AND created_at >= %s AND created_at < %s "
        "ORDER BY created_at DESC, id DESC",
        (ORG, since, until),
    )
    assert len(expected) > 500
    for size in (97, 500):
        got, before = [], None
        while True:
            page = await store.recent(
                ORG, limit=size, before=before, where=RequestFilter(since=since, until=until)
            )
            got += [r.id for r in page]
            if len(page) < size:
                break
            before = (page[-1].created_at, page[-1].id)
        assert got == [r[0] for r in expected]
    totals = await store.totals(ORG, since=since, until=until, group_by="day", limit=10)
    assert sum(t.requests for t in totals) == len(expected) and len(totals) == 3


# --- a batch's columns are built in slices, the reactor served in between ----------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([1, 99, 100, 101, 199, 250, 500]),
    models=st.lists(st.none() | st.text(max_size=12), min_size=1, max_size=7),
    statuses=st.lists(st.integers(100, 599), min_size=1, max_size=5),
)
def test_columns_built_in_slices_are_the_columns_built_at_once(n, models, statuses):
    # quotes, backslashes, commas, braces, NULLs and numbers at every slice
    # boundary: the merged arrays are exactly the arrays of one pass
    from twisted.internet.defer import ensureDeferred, succeed

    from lectr.storage import request_logs

    rows = [
        rec(
            model=models[i % len(models)],
            status=statuses[i % len(statuses)],
            error_type=None if i % 3 else 'a"b\\c,{d}',
        )
        for i in range(n)
    ]
    pauses = []

    def pause():
        pauses.append(1)
        return succeed(None)

    d = ensureDeferred(request_logs._columns_in_slices(rows, pause))
    assert d.result == request_logs._columns(rows)
    assert len(pauses) == (n - 1) // request_logs.PREPARE_SLICE


# --- the array literals' fast paths write what the value-by-value paths write -----------------------


class _Tag(str):
    def __str__(self) -> str:
        return "tag:" + str.__str__(self)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.none() | st.text(max_size=8) | st.sampled_from(['a"b', "c\\d", "{,}", "NULL", ""]),
        max_size=12,
    )
    | st.lists(st.text(alphabet="abc,{} ", max_size=6), max_size=12)
    | st.lists(st.text(alphabet='a"\\\x00,{}', max_size=6), max_size=12)
    | st.lists(st.builds(_Tag, st.text(max_size=4)) | st.integers(), max_size=6)
)
def test_text_arrays_are_the_value_by_value_arrays(values):
    from lectr.storage import request_logs

    assert request_logs._array(values) == request_logs._array_each(values)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.none()
        | st.integers(-(2**63), 2**63)
        | st.floats(allow_nan=False)
        | st.booleans()
        | st.sampled_from(["1.50", "-2E-7", "x,y", 'q"'])
        | st.decimals(allow_nan=False, allow_infinity=False).map(str),
        max_size=12,
    )
)
def test_number_arrays_are_the_value_by_value_arrays(values):
    from lectr.storage import request_logs

    assert request_logs._numbers(values) == request_logs._numbers_each(values)
