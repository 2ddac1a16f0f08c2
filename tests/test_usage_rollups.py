"""Hourly usage rollups against the real PostgreSQL: after any workload —
batches in any order, rows replayed from the spill journal, concurrent
writers — ``usage_hourly`` equals the SUM over ``request_logs``; rows are
priced on the way in; org deletion and retention; the explanation of one
request's cost."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg2
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred, succeed
from twisted.internet.task import Clock

from lectr.db.database import Database
from lectr.managers.orgs import OrgManager
from lectr.managers.usage import UsageManager
from lectr.metrics import Registry
from lectr.pricing.manager import PricingManager
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.storage.request_logs import RequestLogStore
from lectr.usage.journal import decode_record, encode_record
from lectr.usage.model import Usage, UsageRecord
from lectr.usage.recorder import UsageRecorder, synchronous
from tests.support.pg import admin_execute

ORGS = ("00000000-0000-4000-8000-0000000000a1", "00000000-0000-4000-8000-0000000000b2")
KEYS = (None, "00000000-0000-4000-8000-00000000000c", "00000000-0000-4000-8000-00000000000d")
T0 = datetime(2025, 3, 10, 11, 0, tzinfo=UTC)

# Written out independently of the datastore's SQL: what the rollups must equal.
EXPECTED_SQL = """
SELECT org_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       provider, coalesce(model, ''), coalesce(key_id, '00000000-0000-0000-0000-000000000000'),
       count(*), count(*) FILTER (WHERE status >= 400),
       count(*) FILTER (WHERE usage_source = 'none'),
       count(*) FILTER (WHERE usage_source = 'estimated'),
       count(*) FILTER (WHERE usage_source <> 'none' AND cost_usd IS NULL),
       count(*) FILTER (WHERE cached_tokens > 0),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       coalesce(sum(total_tokens), 0), coalesce(sum(cached_tokens), 0),
       coalesce(sum(cache_creation_tokens), 0), coalesce(sum(cache_creation_1h_tokens), 0),
       coalesce(sum(reasoning_tokens), 0), coalesce(sum(cost_usd), 0)
FROM request_logs GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
"""
ROLLUP_SQL = """
SELECT org_id, hour, provider, model, key_id, requests, errors, unmetered, estimated, unpriced,
       cache_hits, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
       cache_creation_tokens, cache_creation_1h_tokens, reasoning_tokens, cost_usd
FROM usage_hourly ORDER BY 1, 2, 3, 4, 5
"""


@pytest.fixture(scope="module")
def pricing():
    return PricingManager(None, reactor=reactor, metrics=Registry())


def record(i: int, *, org=ORGS[0], key=None, provider="openai", model="gpt-4o", at=T0,
           status=200, usage=None) -> UsageRecord:  # fmt: skip
    return UsageRecord(
        request_id=str(uuid.UUID(int=i + 1, version=4)),
        created_at=at,
        org_id=org,
        key_id=key,
        provider=provider,
        model=model,
        method="POST",
        path="/v1/chat/completions",
        status=status,
        latency_ms=10.0,
        ttfb_ms=1.0,
        streamed=False,
        usage=usage if usage is not None else Usage(100, 10, 110, 40, None, "provider"),
    )


counts = st.one_of(st.none(), st.integers(0, 200_000))
usages = st.one_of(
    st.just(Usage()),
    st.builds(
        Usage,
        prompt_tokens=counts,
        completion_tokens=counts,
        total_tokens=counts,
        cached_tokens=counts,
        cache_creation_tokens=counts,
        source=st.sampled_from(["provider", "estimated"]),
        reasoning_tokens=counts,
        cache_creation_1h_tokens=counts,
    ),
)
records = st.builds(
    dict,
    org=st.sampled_from(ORGS),
    key=st.sampled_from(KEYS),
    provider=st.sampled_from(["openai", "anthropic"]),
    model=st.sampled_from([None, "gpt-4o", "claude-sonnet-4-5", "no-such-model"]),
    at=st.integers(0, 3 * 3600 * 10**6 - 1).map(lambda us: T0 + timedelta(microseconds=us)),
    status=st.sampled_from([200, 400, 429, 499, 500]),
    usage=usages,
    priced=st.booleans(),  # priced by the proxy, or left to the recorder/none
)


class _Now:
    """An awaitable that is already done."""

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator that never suspends


def run_now(coro):
    """Run a coroutine that never waits (the SyncDatabase's) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")


class _SyncTransaction:
    def __init__(self, cursor) -> None:
        self._cursor = cursor

    async def execute(self, sql, args=None) -> int:
        self._cursor.execute(sql, args)
        return self._cursor.rowcount

    async def fetchall(self, sql, args=None) -> list[tuple]:
        self._cursor.execute(sql, args)
        return self._cursor.fetchall() if self._cursor.description else []

    async def fetchone(self, sql, args=None):
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    def notify(self, kind, ident) -> None:
        pass


class SyncDatabase:
    """The datastore's own SQL and transactions on a plain psycopg2
    connection: hypothesis runs its examples synchronously, and the
    reactor's greenlet cannot block on a Deferred."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)

    def runInteraction(self, desc, txn):
        with self.conn, self.conn.cursor() as cursor:  # one transaction
            return _Now(run_now(txn(_SyncTransaction(cursor))))

    def runQuery(self, desc, sql, args=None):  # autocommit: one statement, its own transaction
        with self.conn, self.conn.cursor() as cursor:
            cursor.execute(sql, args)
            return _Now(cursor.fetchall() if cursor.description is not None else [])

    def pause(self):
        return succeed(None)  # no reactor to yield to

    def close(self) -> None:
        self.conn.close()


def rollups_match(db_url: str) -> list[tuple]:
    expected = admin_execute(db_url, EXPECTED_SQL)
    actual = admin_execute(db_url, ROLLUP_SQL)
    assert actual == expected
    return actual


@pytest.fixture
def sync_db(db_url):
    db = SyncDatabase(db_url)
    yield db
    db.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(records, min_size=1, max_size=30),
    batches=st.lists(
        st.tuples(st.lists(st.integers(0, 29), min_size=1, max_size=12), st.booleans()),
        min_size=1,
        max_size=6,
    ),
)
def test_rollups_equal_the_sum_of_the_rows_after_any_workload(
    sync_db, db_url, pricing, specs, batches
):
    admin_execute(db_url, "TRUNCATE request_logs, usage_hourly, price_bases")
    store = RequestLogStore(sync_db)
    rows = []
    for i, spec in enumerate(specs):
        priced = spec.pop("priced")
        r = record(i, **spec)
        rows.append(pricing.price_record(r) if priced else r)
    inserted = set()
    total = 0
    for indices, through_journal in batches:
        batch = [rows[i % len(rows)] for i in indices]  # repeats: replays of rows already sent
        if through_journal:  # as the recorder replays a spilled segment
            batch = [decode_record(encode_record(r)) for r in batch]
        total += run_now(store.insert(batch))
        inserted |= {r.request_id for r in batch}
    assert total == len(inserted)  # each row counted once, however often it was sent
    rollups = rollups_match(db_url)
    assert sum(r[5] for r in rollups) == len(inserted)


@pytest_twisted.ensureDeferred
async def test_concurrent_writers_never_double_count_nor_deadlock(db_url, pricing):
    """Several nodes flushing overlapping batches (the same rows replayed by
    two workers) into the same rollup rows at once."""
    pools = [Database(db_url, reactor=reactor, min_size=1, max_size=4) for _ in range(3)]
    for pool in pools:
        await pool.start()
    try:
        rows = [
            pricing.price_record(
                record(
                    i,
                    org=ORGS[i % 2],
                    key=KEYS[i % 3],
                    model=("gpt-4o", "gpt-4o-mini", None)[i % 3],
                    at=T0 + timedelta(minutes=i % 180),
                )
            )
            for i in range(600)
        ]
        stores = [RequestLogStore(pool) for pool in pools]
        jobs = []
        for n in range(24):
            start = (n * 97) % 500
            batch = rows[start : start + 120][:: 1 if n % 2 else -1]  # opposite orders
            jobs.append(ensureDeferred(stores[n % 3].insert(batch)))
        results = await DeferredList(jobs, consumeErrors=True)
        assert all(ok for ok, _ in results), [r for ok, r in results if not ok]
        written = sum(n for _, n in results)
        stored = admin_execute(db_url, "SELECT count(*) FROM request_logs")[0][0]
        assert written == stored
        rollups = rollups_match(db_url)
        assert sum(r[5] for r in rollups) == stored
        assert sum(r[-1] for r in rollups) == sum(
            (r.cost_usd or 0 for r in rows if r.request_id in _ids(db_url)), Decimal(0)
        )
    finally:
        for pool in pools:
            await pool.close()


def _ids(db_url: str) -> set[str]:
    return {r[0] for r in admin_execute(db_url, "SELECT request_id::text FROM request_logs")}


@pytest_twisted.ensureDeferred
async def test_rows_without_a_price_are_priced_by_the_recorder(database, db_url, tmp_path):
    """What the proxy did not price (and what an older spill journal
    holds) is priced before it is written; an estimated prompt count
    becomes the row's prompt count."""
    pricing = PricingManager(None, reactor=reactor, metrics=Registry())
    clock = Clock()
    recorder = UsageRecorder(
        RequestLogStore(database),
        reactor=clock,
        data_dir=tmp_path,
        metrics=Registry(),
        run_in_thread=synchronous,
        pricing=pricing,
    )
    # a line of a journal written before prices existed (19 columns)
    old = record(1, model="gpt-4o-mini")
    line = encode_record(old)
    assert line.count(b",") == 18 and b"{" not in line
    recorder.journal.directory.mkdir(parents=True)
    (recorder.journal.directory / "spill-00000000000000000001-1-aaaa.jsonl").write_bytes(
        json.dumps({"lectr_usage_spill": 1}).encode() + b"\n" + line
    )
    await recorder.start()
    cut = record(
        2, model="gpt-4o-mini", status=499, usage=Usage(completion_tokens=10, source="estimated")
    )
    recorder.record(UsageRecord(**{**_fields(cut), "request_bytes": 4001}))
    unknown = record(3, model="gpt-9")
    recorder.record(unknown)
    clock.advance(1)
    await recorder.wait_idle()
    clock.advance(1)
    await recorder.wait_idle()
    await recorder.stop()
    rows = {
        r[0]: r[1:]
        for r in admin_execute(
            db_url,
            "SELECT request_id::text, cost_usd, prompt_tokens, total_tokens, usage_source, "
            "price_basis_id IS NOT NULL FROM request_logs",
        )
    }
    # gpt-4o-mini 0.15 / 0.075 cached / 0.60: 60 x 0.15 + 40 x 0.075 + 10 x 0.6 = 9 + 3 + 6
    assert rows[old.request_id] == (Decimal("0.000018"), 100, 110, "provider", True)
    # 1001 prompt tokens from 4001 bytes: 1001 x 0.15 + 10 x 0.6 = 150.15 + 6
    assert rows[cut.request_id] == (Decimal("0.00015615"), 1001, 1011, "estimated", True)
    assert rows[unknown.request_id] == (None, 100, 110, "provider", False)
    [(unpriced,)] = admin_execute(db_url, "SELECT sum(unpriced) FROM usage_hourly")
    assert unpriced == 1
    rollups_match(db_url)


def _fields(r: UsageRecord) -> dict:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


@pytest_twisted.ensureDeferred
async def test_price_bases_are_stored_once_and_explain_the_cost(database, db_url, pricing):
    store = RequestLogStore(database)
    rows = [
        pricing.price_record(
            record(
                i,
                provider="anthropic",
                model="claude-sonnet-4-5-20250929",
                usage=Usage(410, 5, 415, 100, 300, "provider", None, 200, raw='{"raw":1}'),
            )
        )
        for i in range(5)
    ]
    assert await store.insert(rows) == 5
    assert await store.insert(rows) == 0
    [(bases,)] = admin_execute(db_url, "SELECT count(*) FROM price_bases")
    assert bases == 1
    explained = await UsageManager(store).explain(rows[0].request_id)
    assert explained.org_id == ORGS[0]
    assert explained.pricing["model"] == "claude-sonnet-4-5"
    assert explained.pricing["checked"] == "2025-10-01"
    assert [(line.kind, line.tokens, str(line.cost)) for line in explained.lines] == [
        ("input", 10, "0.00003"),
        ("cached_input", 100, "0.00003"),
        ("cache_write_5m", 100, "0.000375"),
        ("cache_write_1h", 200, "0.0012"),
        ("output", 5, "0.000075"),
    ]
    assert (explained.total_usd, explained.matches) == ("0.00171", True)
    assert explained.request.cost_usd == "0.00171"
    assert explained.usage_raw == '{"raw":1}'
    assert "catalogue price, checked 2025-10-01" in explained.note
    # a stored cost that no longer adds up is flagged, not hidden
    admin_execute(
        db_url, "UPDATE request_logs SET cost_usd = 1 WHERE request_id = %s", (rows[0].request_id,)
    )
    assert (await UsageManager(store).explain(rows[0].request_id)).matches is False


@pytest_twisted.ensureDeferred
async def test_deleting_an_org_deletes_its_rollups_retention_keeps_them(database, db_url):
    orgs = OrgManager(OrgStore(database), ApiKeyStore(database))
    org, _ = await orgs.create_org("Doomed")
    other, _ = await orgs.create_org("Kept")
    store = RequestLogStore(database)
    old = T0 - timedelta(days=400)
    await store.insert(
        [record(1, org=org.id), record(2, org=other.id), record(3, org=other.id, at=old)]
    )
    # retention expires old rows (this one, older than any partition, is in
    # the default partition); their totals stay (the long-term record)
    assert await store.delete_default_older_than(T0 - timedelta(days=30), 1000) == 1
    assert await store.count() == 2
    assert admin_execute(db_url, "SELECT sum(requests) FROM usage_hourly")[0][0] == 3
    await orgs.delete_org(org.id)
    left = admin_execute(db_url, "SELECT org_id::text, sum(requests) FROM usage_hourly GROUP BY 1")
    assert left == [(other.id, 2)]


@pytest_twisted.ensureDeferred
async def test_totals_by_key_and_hour_with_cost(database, pricing):
    store = RequestLogStore(database)
    k1, k2 = KEYS[1], KEYS[2]
    rows = [
        record(1, key=k1, at=T0 + timedelta(minutes=5)),
        record(2, key=k1, at=T0 + timedelta(minutes=65)),
        record(3, key=k2, at=T0 + timedelta(minutes=70), model="gpt-9"),
        record(4, key=None, at=T0 + timedelta(minutes=70), usage=Usage()),
    ]
    await store.insert([pricing.price_record(r) for r in rows])
    manager = UsageManager(store)
    # gpt-4o: 60 x 2.5 + 40 x 1.25 + 10 x 10 = 150 + 50 + 100 = 300 µ$ per request
    by_key = await manager.usage_totals(
        ORGS[0], since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=2), group_by="key"
    )
    # the range is whole hours: 11:30 is rounded down to 11:00
    assert by_key.since == T0 and by_key.until == T0 + timedelta(hours=2)
    assert [(t.key, t.requests, t.cost_usd, t.unpriced) for t in by_key.items] == [
        (k1, 2, "0.0006", 0),
        (k2, 1, "0", 1),
        (None, 1, "0", 0),
    ]
    assert by_key.items[0].cache_hits == 2 and by_key.items[0].cache_hit_rate == 0.4
    by_hour = await manager.usage_totals(
        ORGS[0], since=T0, until=T0 + timedelta(hours=2), group_by="hour"
    )
    assert [(t.key, t.requests, t.cost_usd) for t in by_hour.items] == [
        ("2025-03-10T11:00:00Z", 1, "0.0003"),
        ("2025-03-10T12:00:00Z", 3, "0.0003"),
    ]


def test_rollup_pages_leave_room_for_hot_updates(db_url):
    # the current hour's rows are updated by every flush (see migration 0006)
    [(options,)] = admin_execute(
        db_url, "SELECT reloptions FROM pg_class WHERE relname = 'usage_hourly'"
    )
    assert "fillfactor=50" in options
