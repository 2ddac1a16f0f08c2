"""Request logs and usage totals through the admin API: keyset pagination,
clamped page sizes, filters that never reach SQL as text, totals by model,
provider and day. Rows are written with the real request-log datastore."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest_twisted
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lectr.errors import BadRequest
from lectr.managers.usage import (
    MAX_SNAPSHOT_XIPS,
    LiveCursor,
    decode_live_cursor,
    encode_live_cursor,
)
from lectr.storage.request_logs import RequestLogStore
from lectr.usage.model import Usage, UsageRecord
from tests.support.admin import start_admin_env

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def record(org_id: str, minutes: int, *, provider="openai", model="gpt-4o-mini", status=200,
           prompt=10, completion=5) -> UsageRecord:  # fmt: skip
    return UsageRecord(
        request_id=str(uuid.uuid4()),
        created_at=T0 + timedelta(minutes=minutes),
        org_id=org_id,
        key_id=None,
        provider=provider,
        model=model,
        method="POST",
        path="/v1/chat/completions" if provider == "openai" else "/v1/messages",
        status=status,
        latency_ms=12.5,
        ttfb_ms=3.0,
        streamed=False,
        usage=Usage(prompt, completion, prompt + completion, 0, None, "provider"),
        error_type=None if status < 400 else "upstream",
    )


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


async def seed(env) -> tuple[str, str]:
    org = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    other = (await env.admin.post("/admin/orgs", {"name": "B"})).json["org"]["id"]
    rows = [
        record(org, 0),
        record(org, 1, model="gpt-4o"),
        record(org, 2, status=429),
        record(org, 60 * 24, provider="anthropic", model="claude-3-5-haiku-latest"),
        record(org, 60 * 24 + 1, status=500, prompt=0, completion=0),
        record(other, 3),
    ]
    assert await RequestLogStore(env.components.database).insert(rows) == len(rows)
    return org, other


@pytest_twisted.ensureDeferred
async def test_keyset_pagination_newest_first(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (await env.admin.get(path, params=params)).json
        pages += 1
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 5
    times = [r["created_at"] for r in seen]
    assert times == sorted(times, reverse=True)
    assert len({r["request_id"] for r in seen}) == 5
    assert seen[0]["status"] == 500 and seen[0]["prompt_tokens"] == 0


@pytest_twisted.ensureDeferred
async def test_page_sizes_are_clamped(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    for limit, count in (("0", 1), ("-7", 1), ("1", 1), ("100000", 5), ("200", 5)):
        page = (await env.admin.get(path, params={"limit": limit})).json
        assert len(page["items"]) == count, limit
    for bad in ("abc", "1.5", ""):
        assert (await env.admin.get(path, params={"limit": bad})).status == 400
    assert (await env.admin.get(path, params={"cursor": "garbage!"})).status == 400


@pytest_twisted.ensureDeferred
async def test_filters(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"

    async def count(**params) -> int:
        answer = await env.admin.get(path, params=params)
        assert answer.status == 200, answer.json
        return len(answer.json["items"])

    assert await count(provider="anthropic") == 1
    assert await count(model="gpt-4o") == 1
    assert await count(status="429") == 1
    assert await count(status="5xx") == 1
    assert await count(status="error") == 2
    assert await count(since="2025-03-02") == 2
    assert await count(until="2025-03-01T12:02:00Z") == 2
    assert await count(since="2025-03-01T12:01:00+00:00", until="2025-03-02T00:00:00") == 2


@pytest_twisted.ensureDeferred
async def test_filter_values_never_reach_sql_as_text(env, db_url):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    # a string filter is a bound parameter: it matches nothing, it changes nothing
    for model in ("x' OR '1'='1", "'; DROP TABLE request_logs; --", "gpt-4o%", "*"):
        answer = await env.admin.get(path, params={"model": model})
        assert (answer.status, answer.json["items"]) == (200, []), model
    # everything else is parsed into a type or refused before any query
    for params in (
        {"provider": "openai' --"},
        {"status": "200 OR 1=1"},
        {"status": "2xx; DROP"},
        {"since": "yesterday"},
        {"until": "2025-13-01"},
        {"limit": "1; DROP TABLE request_logs"},
        {"model": "x" * 257},
        {"order": "id"},
    ):
        assert (await env.admin.get(path, params=params)).status == 400, params
    page = (await env.admin.get(path)).json
    assert len(page["items"]) == 5  # the table is intact


@pytest_twisted.ensureDeferred
async def test_other_orgs_rows_are_not_visible(env):
    org, other = await seed(env)
    page = (await env.admin.get(f"/admin/orgs/{other}/requests")).json
    assert len(page["items"]) == 1
    bob = env.user("auth0|bob")
    bobs = (await bob.post("/admin/orgs", {"name": "Bob's"})).json["org"]["id"]
    assert (await bob.get(f"/admin/orgs/{org}/requests")).status == 404
    assert (await bob.get(f"/admin/orgs/{bobs}/requests")).json["items"] == []


@pytest_twisted.ensureDeferred
async def test_usage_totals(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/usage"
    rng = {"since": "2025-03-01", "until": "2025-03-03"}

    by_model = (await env.admin.get(path, params=rng)).json
    assert by_model["group_by"] == "model"
    totals = {t["key"]: t for t in by_model["items"]}
    assert totals["gpt-4o-mini"]["requests"] == 3
    assert totals["gpt-4o-mini"]["errors"] == 2
    assert totals["gpt-4o-mini"]["prompt_tokens"] == 20
    assert totals["gpt-4o"]["total_tokens"] == 15

    by_provider = (await env.admin.get(path, params={**rng, "group_by": "provider"})).json
    assert {t["key"]: t["requests"] for t in by_provider["items"]} == {
        "openai": 4,
        "anthropic": 1,
    }
    by_day = (await env.admin.get(path, params={**rng, "group_by": "day"})).json
    assert [(t["key"], t["requests"]) for t in by_day["items"]] == [
        ("2025-03-01", 3),
        ("2025-03-02", 2),
    ]

    # default range: the last 30 days (the seeded rows are older)
    recent = (await env.admin.get(path)).json
    assert recent["items"] == []
    since = datetime.fromisoformat(recent["since"])
    until = datetime.fromisoformat(recent["until"])
    # whole hours: since rounded down, until up
    assert since.minute == until.minute == since.second == until.second == 0
    assert timedelta(days=30) <= until - since <= timedelta(days=30, hours=1)

    assert (await env.admin.get(path, params={"group_by": "color"})).status == 400
    reversed_range = {"since": "2025-03-03", "until": "2025-03-01"}
    assert (await env.admin.get(path, params=reversed_range)).status == 400
    too_long = {"since": "2020-01-01", "until": "2025-01-01"}
    assert (await env.admin.get(path, params=too_long)).status == 400


# --- round 2: key filter, live cursor, detail, hourly and per-key totals, per-org totals ---


async def insert(env, *rows: UsageRecord) -> None:
    assert await RequestLogStore(env.components.database).insert(list(rows)) == len(rows)


@pytest_twisted.ensureDeferred
async def test_filter_by_key(env):
    org, _ = await seed(env)
    key_a, key_b = str(uuid.uuid4()), str(uuid.uuid4())
    await insert(
        env,
        dataclasses.replace(record(org, 5), key_id=key_a),
        dataclasses.replace(record(org, 6), key_id=key_a),
        dataclasses.replace(record(org, 7), key_id=key_b),
    )
    path = f"/admin/orgs/{org}/requests"
    page = (await env.admin.get(path, params={"key_id": key_a})).json
    assert [r["key_id"] for r in page["items"]] == [key_a, key_a]
    assert len((await env.admin.get(path, params={"key_id": key_b})).json["items"]) == 1
    assert (await env.admin.get(path, params={"key_id": str(uuid.uuid4())})).json["items"] == []
    for bad in ("not-a-uuid", "1; DROP TABLE request_logs", ""):
        assert (await env.admin.get(path, params={"key_id": bad})).status == 400, bad


@pytest_twisted.ensureDeferred
async def test_live_cursor_returns_only_what_was_stored_since(env):
    org, other = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    first = (await env.admin.get(path, params={"limit": "2"})).json
    live = first["live_cursor"]
    assert isinstance(live, str) and first["next_cursor"] is not None

    nothing = (await env.admin.get(path, params={"after": live})).json
    assert nothing["items"] == [] and nothing["next_cursor"] is None

    # stored later, even with an older time: a live view must see them all,
    # in the order they were stored; another org's rows never
    late = [record(org, 100), record(org, -100), record(org, 101, model="gpt-4o")]
    await insert(env, record(other, 102))
    for row in late:  # (a batch is stored in request-id order: one row per batch here)
        await insert(env, row)
    fresh = (await env.admin.get(path, params={"after": nothing["live_cursor"]})).json
    assert [r["request_id"] for r in fresh["items"]] == [r.request_id for r in late]

    # filters apply; a full page continues where it stopped
    only = (await env.admin.get(path, params={"after": live, "model": "gpt-4o"})).json
    assert [r["request_id"] for r in only["items"]] == [late[2].request_id]
    part = (await env.admin.get(path, params={"after": live, "limit": "2"})).json
    assert len(part["items"]) == 2
    rest = (await env.admin.get(path, params={"after": part["live_cursor"], "limit": "2"})).json
    assert [r["request_id"] for r in part["items"] + rest["items"]] == [r.request_id for r in late]
    caught_up = (await env.admin.get(path, params={"after": fresh["live_cursor"]})).json
    assert caught_up["items"] == []


@pytest_twisted.ensureDeferred
async def test_the_longest_live_cursor_is_taken(env):
    """A cursor in the middle of a run of full pages, with as many
    transactions in progress as a cursor keeps, in both its snapshots."""
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    top = 2**63 - 1
    xips = ",".join(str(top - 1 - i) for i in reversed(range(MAX_SNAPSHOT_XIPS)))
    snapshot = f"{top - 10**6}:{top}:{xips}"
    longest = encode_live_cursor(LiveCursor(snapshot, snapshot, (top, top)))
    answer = await env.admin.get(path, params={"after": longest})
    assert answer.status == 200, answer.json
    assert answer.json["items"] == []


@pytest_twisted.ensureDeferred
async def test_live_cursor_refusals(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    page = (await env.admin.get(path, params={"limit": "1"})).json
    both = {"after": page["live_cursor"], "cursor": page["next_cursor"]}
    answer = await env.admin.get(path, params=both)
    assert answer.status == 400 and "not both" in answer.json["error"]["message"]
    # a page cursor is not a live cursor, and the other way round
    assert (await env.admin.get(path, params={"after": page["next_cursor"]})).status == 400
    assert (await env.admin.get(path, params={"cursor": page["live_cursor"]})).status == 400


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(max_size=80) | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
)
def test_any_after_cursor_is_decoded_or_refused(text):
    try:
        position = decode_live_cursor(text)
    except BadRequest:
        return
    assert position.row_id is not None or position.snapshot
    assert decode_live_cursor(encode_live_cursor(position)) == position


XID = st.integers(min_value=1, max_value=2**63 - 2)


@st.composite
def snapshots(draw) -> str:
    """Valid pg_snapshot texts: 1 <= xmin <= xip < xmax, xips increasing."""
    xmin = draw(XID)
    xmax = draw(st.integers(min_value=xmin, max_value=2**63 - 1))
    xips = []
    if xmax > xmin:
        xips = sorted(
            draw(
                st.sets(
                    st.integers(min_value=xmin, max_value=xmax - 1),
                    max_size=min(MAX_SNAPSHOT_XIPS, xmax - xmin),
                )
            )
        )
    return f"{xmin}:{xmax}:{','.join(map(str, xips))}"


live_cursors = (
    st.builds(LiveCursor, row_id=st.integers(min_value=0, max_value=2**63 - 1))
    | st.builds(LiveCursor, snapshots())
    | st.builds(
        LiveCursor,
        snapshots(),
        snapshots(),
        st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    )
)


def test_a_snapshot_with_too_many_transactions_in_progress_keeps_the_oldest():
    """(it then sees less, never more: the transactions from the next one
    on count as unseen, their rows may come twice, never not at all)"""
    ids = list(range(100, 101 + MAX_SNAPSHOT_XIPS))
    xips = ",".join(map(str, ids))
    many = LiveCursor(f"90:500:{xips}", f"90:500:{xips}", (7, 8))
    kept = f"90:{ids[-1]}:{','.join(map(str, ids[:-1]))}"
    assert decode_live_cursor(encode_live_cursor(many)) == LiveCursor(kept, kept, (7, 8))
    few = LiveCursor("100:500:" + ",".join(str(x) for x in range(100, 100 + MAX_SNAPSHOT_XIPS)))
    assert decode_live_cursor(encode_live_cursor(few)) == few


@settings(max_examples=100, deadline=None)
@given(snapshot=snapshots(), more=st.lists(st.integers(1, 10**6), max_size=3 * MAX_SNAPSHOT_XIPS))
def test_a_kept_snapshot_sees_nothing_its_snapshot_did_not(snapshot, more):
    """Whatever the snapshot, the cursor's sees a subset of what it saw."""
    xmin, xmax, xips = snapshot.split(":")
    top = int(xmax) + sum(more) + len(more) + 1
    assume(top < 2**63)
    ids = sorted({*(int(x) for x in xips.split(",") if x), *(int(xmax) + m for m in more)})
    ids = [x for x in ids if x < top]
    full = f"{xmin}:{top}:{','.join(map(str, ids))}"
    kept = decode_live_cursor(encode_live_cursor(LiveCursor(full))).snapshot

    def visible(snap: str, x: int) -> bool:
        lo, hi, xs = snap.split(":")
        return x < int(lo) or (x < int(hi) and str(x) not in xs.split(","))

    probes = {int(xmin) - 1, int(xmin), top - 1, top, *ids, *(i + 1 for i in ids)}
    for x in probes:
        if x > 0 and visible(kept, x):
            assert visible(full, x), (full, kept, x)


@settings(max_examples=200, deadline=None)
@given(position=live_cursors)
def test_live_cursors_round_trip(position):
    assert decode_live_cursor(encode_live_cursor(position)) == position


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(
            [
                "v2",
                "live:1",
                "1:1:",
                "3:10:5",
                "1:2",
                "0:0:",
                "5:3:",
                "3:10:11",
                "3:10:5,4",
                "3:10:5,5",
                "1:1:1",
                "9" * 20 + ":" + "9" * 20 + ":",
                "2:3",
                "1:2:1,",
                ":",
                "",
                " ",
                "\x00",
                "-1:2:",
            ]
        ),
        max_size=5,
    )
)
@example(words=["v2", "1:1:"])
@example(words=["v2", "3:10:5,4"])
@example(words=["v2", "1:2:", "1:2:1,", "1:2"])
def test_a_snapshot_cursor_is_refused_unless_postgresql_would_read_it(words):
    """Any text made of snapshot-like parts: decoded into snapshots
    PostgreSQL accepts (1 <= xmin <= xip < xmax, increasing, 63-bit), or
    refused with a 400 - never a query that fails."""
    raw = " ".join(words)
    try:
        cursor = decode_live_cursor(base64.urlsafe_b64encode(raw.encode()).decode())
    except BadRequest:
        return
    for snap in filter(None, (cursor.snapshot, cursor.chain)):
        xmin, xmax, xips = snap.split(":")
        ids = [int(x) for x in xips.split(",")] if xips else []
        assert 1 <= int(xmin) <= int(xmax) < 2**63
        assert all(int(xmin) <= x for x in ids)
        assert all(a < b for a, b in itertools.pairwise([*ids, int(xmax)]))


@pytest_twisted.ensureDeferred
async def test_hostile_after_values_answer_400_never_500(env):
    org, _ = await seed(env)
    path = f"/admin/orgs/{org}/requests"
    hostile = [
        "x" * 65,
        "bGl2ZTotMQ",  # live:-1
        base64.urlsafe_b64encode(b"live:99999999999999999999").decode(),
        base64.urlsafe_b64encode(b"live:1 OR 1=1").decode(),
        base64.urlsafe_b64encode(b"live:\x00").decode(),
        base64.urlsafe_b64encode(b"v2 0:0:").decode(),
        base64.urlsafe_b64encode(b"v2 5:3:").decode(),
        base64.urlsafe_b64encode(b"v2 3:10:5,4").decode(),
        base64.urlsafe_b64encode(b"v2 3:10:11").decode(),
        base64.urlsafe_b64encode(b"v2 3:10: 3:10: 1").decode(),
        base64.urlsafe_b64encode(b"v2 3:10: 3:10: 99999999999999999999:1").decode(),
        base64.urlsafe_b64encode(
            ("v2 1:100:" + ",".join(str(i) for i in range(1, 2 + MAX_SNAPSHOT_XIPS))).encode()
        ).decode(),
        "%00",
        "' OR '1'='1",
    ]
    for value in hostile:
        answer = await env.admin.get(path, params={"after": value})
        assert answer.status == 400, (value, answer.status)


@pytest_twisted.ensureDeferred
async def test_one_request(env):
    org, other = await seed(env)
    row = record(org, 9, model="gpt-4o")
    foreign = record(other, 9)
    await insert(env, row, foreign)
    answer = await env.admin.get(f"/admin/orgs/{org}/requests/{row.request_id}")
    assert answer.status == 200
    assert answer.json["request_id"] == row.request_id
    assert answer.json["model"] == "gpt-4o" and answer.json["total_tokens"] == 15
    listed = (await env.admin.get(f"/admin/orgs/{org}/requests", params={"limit": "1"})).json
    assert set(answer.json) == set(listed["items"][0])
    # another org's request, an unknown id, a malformed id: not found
    for rid in (foreign.request_id, str(uuid.uuid4()), "nope"):
        answer = await env.admin.get(f"/admin/orgs/{org}/requests/{rid}")
        assert answer.status == 404, rid
    bob = env.user("auth0|bob")
    assert (await bob.get(f"/admin/orgs/{org}/requests/{row.request_id}")).status == 404


@pytest_twisted.ensureDeferred
async def test_usage_by_hour_and_by_key(env):
    org, _ = await seed(env)
    key = str(uuid.uuid4())
    await insert(env, dataclasses.replace(record(org, 30), key_id=key))
    path = f"/admin/orgs/{org}/usage"
    rng = {"since": "2025-03-01", "until": "2025-03-03"}
    by_hour = (await env.admin.get(path, params={**rng, "group_by": "hour"})).json
    assert by_hour["group_by"] == "hour"
    assert [(t["key"], t["requests"]) for t in by_hour["items"]] == [
        ("2025-03-01T12:00:00Z", 4),
        ("2025-03-02T12:00:00Z", 2),
    ]
    by_key = (await env.admin.get(path, params={**rng, "group_by": "key"})).json
    assert [(t["key"], t["requests"]) for t in by_key["items"]] == [(None, 5), (key, 1)]
    by_day = (await env.admin.get(path, params={**rng, "group_by": "day"})).json
    # every grouping adds up to the same totals
    for grouping in (by_hour, by_key, by_day):
        assert sum(t["requests"] for t in grouping["items"]) == 6
        assert sum(t["prompt_tokens"] for t in grouping["items"]) == 50
    too_long = {"since": "2025-01-01", "until": "2025-02-02", "group_by": "hour"}
    answer = await env.admin.get(path, params=too_long)
    assert answer.status == 400 and "31 days" in answer.json["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_usage_per_org(env):
    org, other = await seed(env)
    rng = {"since": "2025-03-01", "until": "2025-03-03"}
    everything = (await env.admin.get("/admin/usage", params=rng)).json
    assert {t["key"]: t["requests"] for t in everything["items"]} == {org: 5, other: 1}
    totals = {t["key"]: t for t in everything["items"]}
    assert totals[org]["errors"] == 2 and totals[org]["prompt_tokens"] == 40

    # a user sees only the orgs they belong to
    bob = env.user("auth0|bob")
    bobs = (await bob.post("/admin/orgs", {"name": "Bob's"})).json["org"]["id"]
    await insert(env, record(bobs, 1))
    mine = (await bob.get("/admin/usage", params=rng)).json
    assert [(t["key"], t["requests"]) for t in mine["items"]] == [(bobs, 1)]
    carol = env.user("auth0|carol")
    assert (await carol.get("/admin/usage", params=rng)).json["items"] == []

    default = (await env.admin.get("/admin/usage")).json
    until = datetime.fromisoformat(default["until"])
    assert until - datetime.fromisoformat(default["since"]) == timedelta(days=30)
    assert (await env.client(None).get("/admin/usage")).status == 401
    bad = {"since": "2025-03-03", "until": "2025-03-01"}
    assert (await env.admin.get("/admin/usage", params=bad)).status == 400
