"""Request logs and usage totals through the admin API: keyset pagination,
clamped page sizes, filters that never reach SQL as text, totals by model,
provider and day. Rows are written with the real request-log datastore."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest_twisted

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
