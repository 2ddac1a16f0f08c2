"""The usage log path (recorder, request_logs SQL, GenAI batch metrics)
against the real PostgreSQL: hostile values come back as the documented
repair rules say, and no row is lost to a value the recorder repairs."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from lectr.db.database import DatabaseUnavailable
from lectr.metrics import Registry
from lectr.pricing.manager import PricingManager
from lectr.storage.request_logs import RequestLogStore
from lectr.usage.meters import openai_usage
from lectr.usage.model import RAW_USAGE_MAX, Usage, UsageRecord
from lectr.usage.recorder import (
    _TEXT_LIMITS,
    FALLBACK_TEXT_MAX,
    MODEL_MAX,
    UsageRecorder,
    synchronous,
)
from tests.support.pg import admin_execute
from tests.test_usage_recorder import rec as recorder_rec
from tests.test_usage_rollups import EXPECTED_SQL, ROLLUP_SQL, SyncDatabase, run_now

ORG = "00000000-0000-4000-8000-0000000000c3"
OTHER_ORG = "00000000-0000-4000-8000-0000000000d4"
T0 = datetime(2025, 3, 10, 11, 0, tzinfo=UTC)
INT32_MAX = 2**31 - 1


def rec(**kw) -> UsageRecord:
    return recorder_rec(**{"created_at": T0, "org_id": ORG, **kw})


@pytest.fixture
def sync_db(db_url):
    db = SyncDatabase(db_url)
    yield db
    db.close()


class Harness:
    """A real UsageRecorder on the real datastore, run synchronously: a fake
    clock drives the flusher, the SQL runs on a plain psycopg2 connection
    (so hypothesis can drive it example by example)."""

    def __init__(self, db, db_url, tmp_path, **kw) -> None:
        self.db_url = db_url
        self.clock = Clock()
        self.metrics = Registry()
        self.store = RequestLogStore(db)
        options = dict(
            reactor=self.clock,
            data_dir=tmp_path,
            metrics=self.metrics,
            batch_size=1000,
            max_buffer=10_000,
            run_in_thread=synchronous,
            pause=lambda: succeed(None),
        )
        options.update(kw)
        self.recorder = UsageRecorder(self.store, **options)

    def start(self) -> None:
        run_now(self.recorder.start())

    def stop(self) -> None:
        run_now(self.recorder.stop())

    def flush(self) -> None:
        self.clock.advance(1)
        assert self.recorder._flushing is None, "the flush waited on something"

    def value(self, name: str, *labels: str) -> float:
        return self.metrics.get(name).value(*labels)

    def rows(self, columns: str) -> dict[str, tuple]:
        return {
            r[0]: r[1:]
            for r in admin_execute(
                self.db_url, f"SELECT request_id::text, {columns} FROM request_logs"
            )
        }


@pytest.fixture
def harness(sync_db, db_url, tmp_path):
    h = Harness(sync_db, db_url, tmp_path)
    h.start()
    yield h
    h.stop()


def rollups_match(db_url: str) -> None:
    assert admin_execute(db_url, ROLLUP_SQL) == admin_execute(db_url, EXPECTED_SQL)


# --- the documented repair rules, written out independently --------------------------


def repaired_text(value: str | None, limit: int) -> str | None:
    """docs/usage-accounting.md: NUL bytes become U+FFFD, unencodable
    strings (lone surrogates) are replaced, strings are truncated."""
    if value is None:
        return None
    value = value[:limit].replace("\x00", "\ufffd")
    return value.encode("utf-8", "replace").decode("utf-8")


def repaired_count(value) -> int | None:
    """Whole counts (3.0, True as 3 and 1; a fraction cut) in 0..2**31-1;
    anything else becomes NULL."""
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) else None
    elif isinstance(value, bool):
        value = int(value)
    return value if value is not None and 0 <= value <= INT32_MAX else None


def repaired_fallbacks(fallbacks: tuple[dict, ...]) -> list[dict] | None:
    """Texts in the fallback notes repaired as the row's texts are."""
    if not fallbacks:
        return None
    return [
        {k: repaired_text(v, FALLBACK_TEXT_MAX) if isinstance(v, str) else v for k, v in f.items()}
        for f in fallbacks
    ]


# --- values the repair rules cover ------------------------------------------------------------------------------


def test_integral_float_and_bool_counts_are_repaired_not_dropped(harness):
    """3.0 == 3 and True == 1: the repair compares counts by identity, or
    '3.0' / 'True' would reach an int[] array and PostgreSQL refuse the row."""
    floaty = rec(usage=Usage(3.0, 2, 5, None, None, "provider"))
    booly = rec(usage=Usage(7, 3, 10, True, None, "provider"))
    good = rec()
    for r in (floaty, good, booly):
        harness.recorder.record(r)
    harness.flush()
    rows = harness.rows("prompt_tokens, cached_tokens")
    assert harness.value("lectr_usage_rows_dropped_total", "rejected") == 0
    assert rows[floaty.request_id] == (3, None)
    assert rows[booly.request_id] == (7, 1)
    assert good.request_id in rows
    rollups_match(harness.db_url)


def test_fallbacks_with_nul_or_lone_surrogate_are_repaired_not_dropped(harness):
    """The client's model string goes into ``fallbacks`` (a plain request
    rotated to another key after a 429). It is repaired there as in
    ``model``: json.dumps would write \\u0000 / \\ud800, which jsonb refuses."""
    rows = []
    for model in ("gpt-4o\x00", "gpt-\ud800"):
        rows.append(
            rec(
                model=model,
                status=200,
                attempts=2,
                fallbacks=(
                    {
                        "attempt": 1,
                        "provider": "openai",
                        "model": model,
                        "key": "primary",
                        "reason": "429",
                        "status": 429,
                    },
                ),
            )
        )
    for r in rows:
        harness.recorder.record(r)
    harness.flush()
    stored = harness.rows("model, fallbacks")
    assert harness.value("lectr_usage_rows_dropped_total", "rejected") == 0
    assert set(stored) == {r.request_id for r in rows}
    assert stored[rows[0].request_id][0] == "gpt-4o\ufffd"


def test_estimated_prompt_never_pushes_total_out_of_range(harness):
    """The estimated prompt count, added after the repair, plus a completion
    count near 2**31 makes total_tokens > int4: repaired too (NULL)."""
    pricing = PricingManager(None, reactor=harness.clock, metrics=Registry())
    r = rec(
        model="gpt-4o-mini",
        status=499,
        error_type="client_disconnected",
        usage=Usage(completion_tokens=INT32_MAX, source="estimated"),
        request_bytes=400,
    )
    r = pricing.price_record(r)
    assert r.pricing.prompt_estimate == 100
    harness.recorder.record(r)
    harness.flush()
    assert harness.value("lectr_usage_rows_dropped_total", "rejected") == 0
    stored = harness.rows("prompt_tokens, completion_tokens, total_tokens")
    assert stored[r.request_id] == (100, INT32_MAX, None)
    rollups_match(harness.db_url)


def test_a_huge_provider_count_does_not_wreck_the_batchs_genai_metrics(harness):
    """A provider may report any integer (the meter keeps any int >= 0):
    10**400 tokens. Stored as NULL, it is not observed either; and a value a
    histogram cannot sum changes none of its series (it once overflowed
    after the buckets were bumped, losing the batch's remaining series)."""
    huge = openai_usage({"prompt_tokens": 10**400, "completion_tokens": 5}, "gpt-4o-mini")
    assert huge.prompt_tokens == 10**400  # what the proxy would record
    bad = rec(usage=huge)
    others = [rec(org_id=OTHER_ORG, model="gpt-4o") for _ in range(5)]
    harness.recorder.record(bad)
    for r in others:
        harness.recorder.record(r)
    harness.flush()
    assert len(harness.rows("1")) == 6  # the rows themselves are stored
    tokens = harness.metrics.get("gen_ai_client_token_usage")
    labels = ("chat", "openai", "gpt-4o", OTHER_ORG)
    assert tokens.count(*labels, "input") == 5
    assert tokens.count(*labels, "output") == 5
    # no series may hold more bucket counts than observations
    for series in tokens._series.values():
        assert sum(series[:-2]) == series[-1]


# --- pinned behaviour: a generated round trip through the real database -------------------

_SPECIAL = [
    '"',
    "\\",
    "{",
    "}",
    ",",
    "\x00",
    "\ud800",
    "\udfff",
    "😀",
    "模",
    " ",
    "\n",
    "NULL",
    "'",
    "\\N",
    '\\"',
]
hostile_text = st.one_of(
    st.just(""),
    st.just("NULL"),
    st.lists(st.sampled_from(_SPECIAL) | st.characters(blacklist_categories=()), max_size=12).map(
        "".join
    ),
    st.text(st.characters(blacklist_categories=()), max_size=40),
    st.builds(
        lambda s, n: (s or "x") * n,
        st.lists(st.sampled_from(_SPECIAL + ["a"]), min_size=1, max_size=3).map("".join),
        st.integers(1, 2100),
    ),
)
hostile_count = st.one_of(
    st.none(),
    st.integers(0, 1000),
    st.sampled_from([-1, 0, INT32_MAX, INT32_MAX + 1, 2**63, 2**64, -(2**63) - 1]),
    st.integers(-(2**70), 2**70),
    st.sampled_from([3.0, 2.5, True, False, float("nan"), float("inf"), -0.5, 2.0**31]),
)
hostile_fallbacks = st.lists(
    st.fixed_dictionaries(
        {
            "attempt": st.integers(1, 5),
            "provider": st.sampled_from(["openai", "anthropic"]),
            "model": hostile_text,
            "key": hostile_text,
            "reason": st.sampled_from(["rate_limited", "server_error", "connect"]),
            "status": st.sampled_from([429, 503, None]),
        }
    ),
    max_size=2,
).map(tuple)


@st.composite
def hostile_records(draw, i: int = 0):
    u = Usage(
        draw(hostile_count),
        draw(hostile_count),
        draw(hostile_count),
        draw(hostile_count),
        draw(hostile_count),
        draw(st.sampled_from(["provider", "estimated", "none"])),
        reasoning_tokens=draw(hostile_count),
        cache_creation_1h_tokens=draw(hostile_count),
        raw=draw(st.none() | hostile_text),
        model=draw(st.none() | hostile_text),
    )
    return rec(
        request_id=str(uuid.UUID(int=draw(st.integers(1, 2**64)), version=4)),
        created_at=T0 + timedelta(microseconds=draw(st.integers(0, 3 * 3600 * 10**6))),
        org_id=draw(st.sampled_from([ORG, OTHER_ORG])),
        provider=draw(st.sampled_from(["openai", "anthropic"]) | hostile_text),
        model=draw(st.none() | hostile_text),
        method=draw(st.just("POST") | hostile_text),
        path=draw(st.just("/v1/chat/completions") | hostile_text),
        error_type=draw(st.none() | hostile_text),
        route=draw(st.none() | hostile_text),
        usage=u,
        fallbacks=draw(hostile_fallbacks),
    )


_TEXTS = _TEXT_LIMITS  # (the repair rules' limits: what each text column keeps)
_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "cache_creation_1h_tokens",
)
_READ = ", ".join(
    [name for name, _ in _TEXTS]
    + ["usage_raw", "response_model", *_COUNTS, "usage_source", "fallbacks"]
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(hostile_records(), min_size=1, max_size=70, unique_by=lambda r: r.request_id))
def test_hostile_rows_round_trip_as_the_repair_rules_say(sync_db, db_url, tmp_path_factory, batch):
    admin_execute(db_url, "TRUNCATE request_logs, usage_hourly, price_bases")
    h = Harness(sync_db, db_url, tmp_path_factory.mktemp("spill"))
    h.start()
    for r in batch:
        h.recorder.record(r)
    h.flush()
    assert h.value("lectr_usage_rows_dropped_total", "rejected") == 0
    assert h.value("lectr_usage_rows_dropped_total", "invalid") == 0
    stored = h.rows(_READ)
    assert set(stored) == {r.request_id for r in batch}
    for r in batch:
        want = (
            *[repaired_text(getattr(r, name), limit) for name, limit in _TEXTS],
            repaired_text(r.usage.raw, RAW_USAGE_MAX),
            repaired_text(r.usage.model, MODEL_MAX),
            *[repaired_count(getattr(r.usage, name)) for name in _COUNTS],
            r.usage.source,
            repaired_fallbacks(r.fallbacks),
        )
        assert stored[r.request_id] == want
    rollups_match(db_url)
    assert h.value("lectr_usage_rows_written_total") == len(batch)
    h.stop()


class FailingCall:
    """The real datastore; the call numbered ``fail_at`` (1-based) fails as if
    PostgreSQL had gone away."""

    def __init__(self, store: RequestLogStore, fail_at: int) -> None:
        self.store = store
        self.fail_at = fail_at
        self.calls: list[int] = []

    async def insert(self, rows):
        self.calls.append(len(rows))
        if len(self.calls) == self.fail_at:
            raise DatabaseUnavailable("insert_request_logs: connection lost")
        return await self.store.insert(rows)


def test_a_row_rejected_before_an_outage_is_not_rejected_twice(sync_db, db_url, tmp_path):
    """A batch with one bad row is bisected; PostgreSQL goes away before the
    second half is written. Only the rows not yet written or rejected are
    spilled: the rejected row is dropped once, not again on the replay."""
    bad = rec(key_id="0000")  # a malformed id: PostgreSQL refuses it
    good = [rec() for _ in range(3)]
    batch = [good[0], bad, good[1], good[2]]
    h = Harness(sync_db, db_url, tmp_path)
    # calls: the batch (refused), [good0, bad] (refused), [good0], [bad]
    # (refused: dropped), then [good1, good2]: PostgreSQL is gone
    failing = FailingCall(h.store, fail_at=5)
    h.recorder._store = failing
    h.start()
    for r in batch:
        h.recorder.record(r)
    h.flush()
    assert failing.calls[:5] == [4, 2, 1, 1, 2]
    assert not h.recorder.database_writable
    for _ in range(5):
        h.flush()
    assert set(h.rows("1")) == {r.request_id for r in good}
    assert h.recorder.journal.segments() == []
    rollups_match(db_url)
    h.stop()
    assert h.value("lectr_usage_rows_dropped_total", "rejected") == 1
