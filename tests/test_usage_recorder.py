"""The usage recorder: a fake clock drives the flusher, rows go to the real
PostgreSQL. Failures are injected around the real datastore."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import psycopg2
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry
from lectr.storage.request_logs import PREPARE_SLICE, RequestLogStore
from lectr.usage.journal import SpillJournal, decode_record, encode_record
from lectr.usage.model import Usage, UsageRecord
from lectr.usage.recorder import (
    SPILL_DIRNAME,
    SPLIT_MIN,
    UsageRecorder,
    _clean_fully,
    _plainly_clean,
    _split,
    clean_record,
    synchronous,
)

ORG = "00000000-0000-4000-8000-0000000000c3"


def rec(**kw) -> UsageRecord:
    fields = dict(
        request_id=str(uuid.uuid4()),
        created_at=datetime.now(UTC),
        org_id=ORG,
        key_id=None,
        provider="openai",
        model="gpt-4o-mini",
        method="POST",
        path="/v1/chat/completions",
        status=200,
        latency_ms=12.5,
        ttfb_ms=3.0,
        streamed=True,
        usage=Usage(7, 3, 10, None, None, "provider"),
    )
    fields.update(kw)
    return UsageRecord(**fields)


class FlakyStore:
    """The real datastore, with failures injected on demand."""

    def __init__(self, store: RequestLogStore) -> None:
        self.store = store
        self.fail_with: list[BaseException] = []  # raised by the next calls, in order
        self.down = False  # every call fails as if PostgreSQL were unreachable
        self.hold: Deferred | None = None  # calls wait for this first
        self.calls: list[int] = []  # batch sizes

    async def insert(self, rows):
        self.calls.append(len(rows))
        if self.hold is not None:
            await self.hold
        if self.down:
            raise DatabaseUnavailable("insert_request_logs: connection lost")
        if self.fail_with:
            raise self.fail_with.pop(0)
        return await self.store.insert(rows)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Registry:
    return Registry()


@pytest.fixture
def store(database) -> FlakyStore:
    return FlakyStore(RequestLogStore(database))


@pytest.fixture
def make_recorder(store, clock, metrics, tmp_path):
    made = []

    def make(**kw) -> UsageRecorder:
        target = kw.pop("store", store)
        options = dict(
            reactor=clock,
            data_dir=tmp_path,
            metrics=metrics,
            batch_size=100,
            max_buffer=1000,
            run_in_thread=synchronous,
            # the flusher's turns between slices of a batch: on the real
            # reactor, which the fake clock does not drive
            pause=lambda: deferLater(reactor, 0, lambda: None),
        )
        options.update(kw)
        recorder = UsageRecorder(target, **options)
        made.append(recorder)
        return recorder

    return make


@pytest.fixture
def logs():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events) -> list[str]:
    return [formatEvent(e) for e in events]


def value(metrics: Registry, name: str, *labels: str) -> float:
    return metrics.get(name).value(*labels)


GENAI = ("chat", "openai", "gpt-4o-mini", ORG)


def genai_requests(metrics: Registry) -> float:
    return metrics.get("gen_ai_server_request_duration").count(*GENAI, "")


async def turns_until(condition, most: int = 200) -> None:
    """Let the real reactor turn until ``condition()`` holds (at most ``most`` turns)."""
    for _ in range(most):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    assert condition()


async def tick(clock: Clock, recorder: UsageRecorder, seconds: float = 1.0) -> None:
    clock.advance(seconds)
    await recorder.wait_idle()


async def stored(store: FlakyStore) -> list[str]:
    rows = await store.store._db.runQuery(
        "t", "SELECT request_id::text FROM request_logs ORDER BY request_id"
    )
    return [r[0] for r in rows]


async def assert_exactly_once(store: FlakyStore, records: list[UsageRecord]) -> None:
    ids = await stored(store)
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert sorted(ids) == sorted(r.request_id for r in records)


# --- batching -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rows_wait_for_the_tick_and_go_in_batches(make_recorder, clock, store, metrics):
    recorder = make_recorder(statement_rows=100, parallel=1)
    await recorder.start()
    rows = [rec() for _ in range(250)]
    for r in rows[:99]:
        assert recorder.record(r) is None
    await recorder.wait_idle()
    assert store.calls == []  # nothing until the tick (or a full batch)
    assert value(metrics, "lectr_usage_rows_buffered") == 99
    await tick(clock, recorder)
    assert store.calls == [99]
    for r in rows[99:]:
        recorder.record(r)
    await tick(clock, recorder, 0)  # a full batch flushes at once, not at the next tick
    await tick(clock, recorder)
    assert sum(store.calls) == 250
    assert store.calls == [99, 76, 75]  # at most 100 rows per statement, of even sizes
    assert value(metrics, "lectr_usage_rows_written_total") == 250
    assert value(metrics, "lectr_usage_rows_recorded_total") == 250
    assert value(metrics, "lectr_usage_rows_buffered") == 0
    assert metrics.get("lectr_usage_flush_seconds").count() == len(store.calls)
    await assert_exactly_once(store, rows)
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_full_buffer_flushes_early(make_recorder, clock, store):
    recorder = make_recorder()
    await recorder.start()
    for _ in range(100):
        recorder.record(rec())
    clock.advance(0)  # the early flush, well before the second is up
    await recorder.wait_idle()
    assert store.calls == [100]
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_one_flush_at_a_time_and_the_backlog_follows(make_recorder, clock, store):
    recorder = make_recorder()
    await recorder.start()
    store.hold = Deferred()
    first = [rec() for _ in range(10)]
    for r in first:
        recorder.record(r)
    clock.advance(1)
    assert store.calls == [10]
    more = [rec() for _ in range(250)]
    for r in more:
        recorder.record(r)
    clock.advance(0)
    clock.advance(1)
    assert store.calls == [10]  # the flush in flight is not doubled
    hold, store.hold = store.hold, None
    hold.callback(None)
    await recorder.wait_idle()
    clock.advance(0)  # the backlog (a full batch or more) goes at once
    await recorder.wait_idle()
    await tick(clock, recorder)
    assert sum(store.calls) == 260
    await assert_exactly_once(store, first + more)
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_is_prepared_a_slice_per_turn_of_the_reactor(
    make_recorder, clock, store, metrics
):
    # the flusher shares the reactor with the requests: a batch is counted
    # and repaired PREPARE_SLICE rows per turn, never in one piece, and the
    # write starts after the last slice (the turns are fired by hand here)
    turns: list[Deferred] = []

    def pause() -> Deferred:
        turns.append(Deferred())
        return turns[-1]

    recorder = make_recorder(batch_size=500, max_buffer=5000, pause=pause)
    await recorder.start()
    rows = [rec() for _ in range(2 * PREPARE_SLICE + 50)]
    for r in rows:
        recorder.record(r)
    clock.advance(1)  # the tick: the first slice
    assert genai_requests(metrics) == PREPARE_SLICE
    assert (len(turns), store.calls) == (1, [])
    assert recorder.buffered == len(rows)  # still counted while being prepared
    turns[0].callback(None)
    assert genai_requests(metrics) == 2 * PREPARE_SLICE
    assert (len(turns), store.calls) == (2, [])
    turns[1].callback(None)  # the last slice, and the write
    assert genai_requests(metrics) == len(rows)
    assert (len(turns), store.calls) == (2, [len(rows)])
    await recorder.wait_idle()
    await assert_exactly_once(store, rows)
    await recorder.stop()


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=20_000),
    most=st.integers(min_value=1, max_value=5_000),
    parallel=st.integers(min_value=1, max_value=4),
)
def test_a_write_is_split_in_even_statements(n, most, parallel):
    rows = list(range(n))
    batches = _split(rows, most, parallel)
    assert [r for b in batches for r in b] == rows  # every row once, in order
    assert all(0 < len(b) <= most for b in batches)
    if batches:  # one size, the last one taking what is left
        size = len(batches[0])
        assert all(len(b) == size for b in batches[:-1]) and len(batches[-1]) <= size
    if n >= parallel * SPLIT_MIN:
        assert len(batches) >= parallel  # enough rows: every connection gets a statement
    if n:
        assert len(batches) <= max(-(-n // most), parallel)


@pytest_twisted.ensureDeferred
async def test_statements_go_in_parallel_and_a_failed_one_is_spilled_alone(
    make_recorder, clock, store, metrics
):
    # 1,000 rows buffered: four statements of 250, two in flight at a time.
    # The first fails (PostgreSQL went away): it and the two not yet sent are
    # spilled, the one that committed is not; the replay completes the rest.
    recorder = make_recorder(max_buffer=5000, statement_rows=300, parallel=2, retry_max=2.0)
    await recorder.start()
    rows = [rec() for _ in range(1000)]
    for r in rows:
        recorder.record(r)
    store.hold = Deferred()
    store.fail_with.append(DatabaseUnavailable("insert_request_logs: connection lost"))
    clock.advance(0)
    await turns_until(lambda: len(store.calls) == 2)  # (the batch is prepared in slices)
    assert store.calls == [250, 250]  # both sent before either answered
    hold, store.hold = store.hold, None
    hold.callback(None)
    await recorder.wait_idle()
    assert store.calls == [250, 250]  # the other two were not sent: spilled
    assert not recorder.database_writable
    assert value(metrics, "lectr_usage_rows_written_total") == 250
    assert value(metrics, "lectr_usage_rows_spilled_total") == 750
    for _ in range(4):
        await tick(clock, recorder, 2)
    assert recorder.database_writable
    assert value(metrics, "lectr_usage_rows_replayed_total") == 750
    await assert_exactly_once(store, rows)
    await recorder.stop()


# --- failures -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_loop_survives_every_kind_of_failure(make_recorder, clock, store, metrics):
    recorder = make_recorder(retry_max=2.0)
    await recorder.start()
    rows = []
    for error in (
        RuntimeError("unexpected"),
        psycopg2.OperationalError("server closed the connection"),
        DatabaseUnavailable("refused"),
        psycopg2.ProgrammingError("relation does not exist"),
    ):
        store.fail_with.append(error)
        batch = [rec() for _ in range(5)]
        rows += batch
        for r in batch:
            recorder.record(r)
        for _ in range(3):
            await tick(clock, recorder)
        assert recorder._loop.running
    # every failed batch was spilled and replayed; nothing lost, nothing doubled
    await tick(clock, recorder, 5)
    await tick(clock, recorder, 5)
    await assert_exactly_once(store, rows)
    assert value(metrics, "lectr_usage_flush_failures_total") == 4
    assert value(metrics, "lectr_usage_rows_spilled_total") == 20
    assert value(metrics, "lectr_usage_rows_replayed_total") == 20
    assert recorder.database_writable
    assert not recorder.journal.segments()
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_outage_spills_then_replays_exactly_once(make_recorder, clock, store, metrics, logs):
    recorder = make_recorder(retry_max=4.0)
    await recorder.start()
    before = [rec() for _ in range(30)]
    for r in before:
        recorder.record(r)
    await tick(clock, recorder)
    store.down = True
    during = [rec() for _ in range(430)]
    for i, r in enumerate(during):
        recorder.record(r)
        if i % 50 == 0:
            await tick(clock, recorder)
    for _ in range(5):
        await tick(clock, recorder)
    assert not recorder.database_writable
    assert value(metrics, "lectr_usage_database_writable") == 0
    assert value(metrics, "lectr_usage_rows_spilled_total") == 430
    assert value(metrics, "lectr_usage_spill_bytes") > 0
    # while down, ticks spill without asking PostgreSQL every time (backoff)
    attempts = len(store.calls)
    await tick(clock, recorder, 1)
    assert len(store.calls) <= attempts + 1
    assert any("cannot write usage rows to PostgreSQL" in t for t in texts(logs))

    store.down = False
    after = [rec() for _ in range(20)]
    for r in after:
        recorder.record(r)
    for _ in range(8):
        await tick(clock, recorder, 4)
    assert recorder.database_writable
    await assert_exactly_once(store, before + during + after)
    assert value(metrics, "lectr_usage_rows_replayed_total") == 430
    assert value(metrics, "lectr_usage_rows_dropped_total", "spill_full") == 0
    # the GenAI metrics saw every request once: spilled and replayed rows too
    assert genai_requests(metrics) == 480
    assert metrics.get("gen_ai_client_token_usage").sum(*GENAI, "input") == 7 * 480
    assert recorder.journal.segments() == []
    assert any("reach PostgreSQL again" in t for t in texts(logs))
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_poison_rows_are_isolated_and_repairable_rows_kept(
    make_recorder, clock, store, metrics, logs
):
    recorder = make_recorder(batch_size=64, max_buffer=640)
    await recorder.start()
    good = [rec() for _ in range(60)]
    nul = rec(model="gpt\x00-4o", error_type="bad\x00type")
    surrogate = rec(path="/v1/\ud800chat")
    huge = rec(usage=Usage(2**40, -1, 3, None, None, "provider"), status=70000)
    long = rec(model="m" * 10_000)
    bad_uuid = rec(org_id="not-a-uuid")
    bad_key = rec(key_id="0000")
    batch = good[:20] + [nul, bad_uuid] + good[20:40] + [surrogate, huge, long, bad_key] + good[40:]
    for r in batch:
        recorder.record(r)
    await tick(clock, recorder)
    await tick(clock, recorder)
    ids = await stored(store)
    kept = good + [nul, surrogate, huge, long]
    assert sorted(ids) == sorted(r.request_id for r in kept)
    assert value(metrics, "lectr_usage_rows_dropped_total", "rejected") == 2
    assert value(metrics, "lectr_usage_rows_spilled_total") == 0  # a data error is no outage
    rows = dict(
        await store.store._db.runQuery(
            "t",
            "SELECT request_id::text, array[model, error_type, path, status::text, "
            "prompt_tokens::text, completion_tokens::text] FROM request_logs "
            "WHERE request_id = ANY(%s::uuid[])",
            ([nul.request_id, surrogate.request_id, huge.request_id, long.request_id],),
        )
    )
    assert rows[nul.request_id][:2] == ["gpt\ufffd-4o", "bad\ufffdtype"]
    assert rows[surrogate.request_id][2] == "/v1/?chat"
    assert rows[huge.request_id][3:] == ["0", None, None]
    assert len(rows[long.request_id][0]) == 256
    rejected = [t for t in texts(logs) if "rejected by PostgreSQL" in t]
    assert len(rejected) == 2
    assert any(bad_uuid.request_id in t for t in rejected)
    await recorder.stop()


def test_clean_record_leaves_good_rows_alone_and_refuses_non_rows():
    r = rec()
    assert _plainly_clean(r) and clean_record(r) is r
    tiered = rec(
        usage=Usage(7, 3, 10, source="provider", service_tier="flex", web_search_requests=2)
    )
    assert _plainly_clean(tiered) and clean_record(tiered) is tiered
    for tier in ("Flex", "x" * 33, "", 3, "fl\nex"):
        cleaned = clean_record(rec(usage=Usage(7, source="provider", service_tier=tier))).usage
        assert cleaned.service_tier is None and cleaned.prompt_tokens == 7
    for searches, kept in ((-1, None), (2**31, None), (True, 1), (3.0, 3), (4, 4), ("2", None)):
        cleaned = clean_record(rec(usage=Usage(7, source="provider", web_search_requests=searches)))
        assert cleaned.usage.web_search_requests == kept
        assert type(cleaned.usage.web_search_requests) in (int, type(None))
    naive = rec(created_at=datetime(2025, 1, 1))
    assert clean_record(naive).created_at.tzinfo is UTC
    assert clean_record(rec(usage=Usage(source="bogus"))).usage.source == "none"
    assert clean_record(rec(latency_ms=5)).latency_ms == 5.0
    with pytest.raises(ValueError):
        clean_record(rec(created_at="yesterday"))
    with pytest.raises(ValueError):
        clean_record({"request_id": "x"})


def _either(good, *bad):
    """Mostly the good value (so that whole rows are often clean), else one
    of the hostile ones."""
    return st.one_of(st.just(good), st.just(good), st.sampled_from(bad))


_TEXTS = ("", "x" * 3000, "a\x00b", "é", "\ud800", 7, None, b"bytes")
_COUNTS = (-1, 2**31, 2**31 - 1, 0, 3.0, 2.5, float("nan"), True, "5", None)
_USAGES = st.builds(
    Usage,
    *[_either(7, *_COUNTS) for _ in range(5)],
    source=_either("provider", "estimated", "none", "bogus", None),
    reasoning_tokens=_either(None, *_COUNTS),
    cache_creation_1h_tokens=_either(None, *_COUNTS),
    service_tier=_either(None, "flex", "priority", "Flex", "x" * 33, "a b", "\ud800", *_TEXTS),
    web_search_requests=_either(None, *_COUNTS),
    raw=_either(None, '{"a":1}', *_TEXTS),
    model=_either(None, "gpt-4o", *_TEXTS),
)


@settings(max_examples=500, deadline=None)
@given(
    r=st.builds(
        rec,
        request_id=_either(str(uuid.uuid4()), 5, None),
        key_id=_either(None, ORG, 5),
        created_at=_either(datetime.now(UTC), datetime(2025, 1, 1), "yesterday"),
        provider=_either("openai", *_TEXTS),
        model=_either("gpt-4o-mini", *_TEXTS),
        method=_either("POST", *_TEXTS),
        path=_either("/v1/chat/completions", *_TEXTS),
        status=_either(200, -1, 70000, 200.0, True, "200", None),
        latency_ms=_either(12.5, 12, "x", None, float("inf")),
        ttfb_ms=_either(None, 3.0, 3, "x"),
        streamed=_either(True, False, 1, None),
        usage=_either(Usage(7, 3, 10, None, None, "provider"), None) | _USAGES,
        error_type=_either(None, "upstream_error", *_TEXTS),
        route=_either(None, "fast", *_TEXTS),
        provider_key_id=_either(None, ORG, 5),
        attempts=_either(1, 0, -1, 40000, 1.0, True),
        request_bytes=_either(0, 10, -1, 1.5, None),
        cost_usd=_either(
            None, Decimal("0.0001"), Decimal("NaN"), Decimal("1e20"), Decimal("-1e20"), 0.5
        ),
    )
)
def test_the_quick_check_passes_only_rows_the_full_check_leaves_alone(r):
    """A row the quick check passes is one the full check would return
    unchanged, whatever its values (hostile types, bounds, text PostgreSQL
    refuses, non-finite numbers): it may not even be invalid."""
    if _plainly_clean(r):
        assert _clean_fully(r) is r


@pytest_twisted.ensureDeferred
async def test_malformed_records_never_raise_into_the_caller(make_recorder, clock, metrics, store):
    recorder = make_recorder()
    await recorder.start()
    recorder.record(rec(created_at=None))
    recorder.record("not a record")
    ok = rec()
    recorder.record(ok)
    await tick(clock, recorder)
    await assert_exactly_once(store, [ok])
    assert value(metrics, "lectr_usage_rows_dropped_total", "invalid") == 2
    await recorder.stop()


# --- memory and disk bounds ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_hanging_write_does_not_keep_rows_in_memory(make_recorder, clock, store, metrics):
    recorder = make_recorder(stall_timeout=5.0)
    await recorder.start()
    store.hold = Deferred()
    first = [rec() for _ in range(10)]
    for r in first:
        recorder.record(r)
    clock.advance(1)  # the write starts, and hangs
    later = [rec() for _ in range(40)]
    for r in later:
        recorder.record(r)
    for _ in range(4):
        clock.advance(1)
    assert recorder.buffered == 50  # still within the stall timeout
    for _ in range(3):
        clock.advance(1)
    assert recorder.buffered == 10  # only the rows of the hanging write
    assert value(metrics, "lectr_usage_rows_spilled_total") == 40
    hold, store.hold = store.hold, None
    hold.callback(None)
    await recorder.wait_idle()
    await tick(clock, recorder)
    await assert_exactly_once(store, first + later)
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_buffer_cap_spills_when_writes_fall_behind(make_recorder, clock, store, metrics):
    recorder = make_recorder(batch_size=10, max_buffer=100)
    await recorder.start()
    store.hold = Deferred()
    rows = [rec() for _ in range(350)]
    recorder.record(rows[0])
    clock.advance(1)  # a write starts and waits
    for r in rows[1:]:
        recorder.record(r)
        assert recorder.buffered <= 101
    assert value(metrics, "lectr_usage_rows_spilled_total") == 300
    hold, store.hold = store.hold, None
    hold.callback(None)
    for _ in range(40):
        await tick(clock, recorder)
    await assert_exactly_once(store, rows)
    assert genai_requests(metrics) == 350
    await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_drops_are_counted_and_logged_when_the_disk_budget_is_spent(
    make_recorder, clock, store, metrics, logs
):
    per_row = len(encode_record(rec()))
    recorder = make_recorder(spill_max_bytes=per_row * 25 + 100)
    await recorder.start()
    store.down = True
    rows = [rec() for _ in range(40)]
    for r in rows:
        recorder.record(r)
    await tick(clock, recorder)
    spilled = value(metrics, "lectr_usage_rows_spilled_total")
    dropped = value(metrics, "lectr_usage_rows_dropped_total", "spill_full")
    assert 20 <= spilled <= 25
    assert spilled + dropped == 40
    assert recorder.journal.size <= per_row * 25 + 100
    assert any("spill journal is full" in t and f"dropped {dropped:.0f}" in t for t in texts(logs))
    store.down = False
    for _ in range(5):
        await tick(clock, recorder, 30)
    assert len(await stored(store)) == spilled
    await recorder.stop()


# --- start and stop -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_flushes_the_last_rows(make_recorder, clock, store, metrics):
    recorder = make_recorder()
    await recorder.start()
    rows = [rec() for _ in range(42)]
    for r in rows:
        recorder.record(r)
    await recorder.stop()
    await assert_exactly_once(store, rows)
    assert not recorder._loop.running
    recorder.record(rec())  # too late: counted, not raised
    assert value(metrics, "lectr_usage_rows_dropped_total", "after_stop") == 1
    await recorder.stop()  # idempotent


@pytest_twisted.ensureDeferred
async def test_stop_spills_when_the_database_is_down_and_the_next_start_replays(
    make_recorder, clock, store, metrics, tmp_path
):
    recorder = make_recorder()
    await recorder.start()
    store.down = True
    rows = [rec() for _ in range(42)]
    for r in rows:
        recorder.record(r)
    await recorder.stop()
    assert len(SpillJournal(tmp_path / SPILL_DIRNAME, max_bytes=10**9).segments()) == 1
    assert await stored(store) == []

    store.down = False
    again = make_recorder()
    await again.start()
    await tick(clock, again)
    await assert_exactly_once(store, rows)
    assert again.journal.segments() == []
    await again.stop()


@pytest_twisted.ensureDeferred
async def test_stop_does_not_wait_forever_for_a_hanging_write(make_recorder, clock, store):
    recorder = make_recorder(stop_timeout=3.0)
    await recorder.start()
    store.hold = Deferred()
    rows = [rec() for _ in range(7)]
    for r in rows:
        recorder.record(r)
    clock.advance(1)
    stopping = Deferred.fromCoroutine(recorder.stop())
    assert not stopping.called
    clock.advance(3.5)
    await stopping
    assert len(recorder.journal.segments()) == 1  # the hanging write's rows, on disk
    hold, store.hold = store.hold, None
    hold.callback(None)  # the late write lands too: the replay will skip them
    await recorder.wait_idle()
    again = make_recorder()
    await again.start()
    await tick(clock, again)
    await assert_exactly_once(store, rows)
    await again.stop()


# --- the journal --------------------------------------------------------------------------------


def test_journal_round_trip_and_torn_lines(tmp_path):
    journal = SpillJournal(tmp_path, max_bytes=10**7)
    rows = [
        rec(model='quote"and\\slash', usage=Usage(1, 2, 3, 4, 5, "estimated")),
        rec(key_id=str(uuid.uuid4()), ttfb_ms=None, error_type="upstream_timeout"),
        rec(model="\ud800 lone", created_at=datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
    ]
    assert journal.append(rows).written == 3
    journal.close()
    [path] = journal.segments()
    with open(path, "ab") as f:
        f.write(b'["torn line')
    segment = journal.claim()
    records, bad = segment.read()
    assert records == rows
    assert bad == 1
    segment.delete()
    assert journal.segments() == []
    assert journal.claim() is None


def test_journal_segments_are_locked_across_processes(tmp_path):
    writer = SpillJournal(tmp_path, max_bytes=10**7)
    other = SpillJournal(tmp_path, max_bytes=10**7)  # another worker, same data dir
    writer.append([rec()])
    assert other.claim() is None  # the writer still holds its segment
    writer.close()
    claimed = other.claim()
    assert claimed is not None
    assert writer.claim() is None  # claimed by the other worker
    claimed.release()
    again = writer.claim()
    assert again is not None and again.path == claimed.path
    again.delete()


def test_journal_rotates_segments(tmp_path):
    journal = SpillJournal(tmp_path, max_bytes=10**7, segment_bytes=2000)
    for _ in range(10):
        journal.append([rec() for _ in range(3)])
    journal.close()
    segments = journal.segments()
    assert len(segments) >= 4
    total = 0
    while (seg := journal.claim()) is not None:
        total += len(seg.read()[0])
        seg.delete()
    assert total == 30


def test_metrics_are_exposed(make_recorder, metrics):
    make_recorder()
    text = metrics.render()
    for name in (
        "lectr_usage_rows_buffered",
        "lectr_usage_rows_written_total",
        "lectr_usage_rows_spilled_total",
        "lectr_usage_rows_replayed_total",
        "lectr_usage_rows_dropped_total",
        "lectr_usage_flush_seconds",
        "lectr_usage_spill_bytes",
        "lectr_usage_database_writable",
    ):
        assert f"# TYPE {name} " in text


def test_a_spilled_row_keeps_its_service_tier_and_web_searches():
    """A row written to the spill journal while PostgreSQL is away comes back
    with what its cost depends on; a journal line from before these fields
    (no such keys) reads as none."""
    usage = Usage(7, 3, 10, source="provider", service_tier="priority", web_search_requests=4)
    back = decode_record(encode_record(rec(usage=usage))).usage
    assert (back.service_tier, back.web_search_requests) == ("priority", 4)
    plain = decode_record(encode_record(rec(usage=Usage(7, 3, 10, source="provider")))).usage
    assert (plain.service_tier, plain.web_search_requests) == (None, None)
