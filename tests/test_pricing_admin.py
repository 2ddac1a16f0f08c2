"""Prices through the admin API and across nodes: the catalogue and the
overrides (GET/PUT/DELETE /admin/pricing), a change reaching every node
through NOTIFY, and one request's cost explained (GET /admin/requests/{id}).
Real PostgreSQL, real HTTP; answers are checked against the OpenAPI
document by the test client."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.db.notify import ChangeListener
from lectr.metrics import Registry
from lectr.pricing.manager import PricingManager
from lectr.storage.pricing import PricingStore
from lectr.storage.request_logs import RequestLogStore
from lectr.usage.model import Usage, UsageRecord
from tests.support.admin import start_admin_env
from tests.support.pg import admin_execute


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


def mini(**extra) -> dict:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input": "1.5",
        "output": 2,
        "cached_input": "0.5",
        "checked": "2026-01-02",
        **extra,
    }


@pytest_twisted.ensureDeferred
async def test_the_catalogue_and_its_resolution(env):
    everything = (await env.admin.get("/admin/pricing")).json["items"]
    assert {p["provider"] for p in everything} >= {"openai", "anthropic", "gemini", "xai"}
    assert all(p["source"] == "catalogue" for p in everything)
    anthropic = (await env.admin.get("/admin/pricing", params={"provider": "anthropic"})).json
    assert {p["provider"] for p in anthropic["items"]} == {"anthropic"}
    [sonnet] = [p for p in anthropic["items"] if p["model"] == "claude-sonnet-4-5"]
    assert sonnet["long_context"] == {
        "threshold": 200000,
        "input": "6",
        "output": "22.5",
        "cached_input": "0.6",
        "cache_write_5m": "7.5",
        "cache_write_1h": "12",
    }
    snap = {"provider": "azure", "model": "gpt-4o-2024-08-06"}
    [entry] = (await env.admin.get("/admin/pricing", params=snap)).json["items"]
    assert (entry["provider"], entry["model"], entry["input"]) == ("openai", "gpt-4o", "2.5")
    none = {"provider": "openai", "model": "gpt-4o-audio-preview"}
    assert (await env.admin.get("/admin/pricing", params=none)).json["items"] == []
    lonely = await env.admin.get("/admin/pricing", params={"model": "gpt-4o"})
    assert lonely.status == 400
    bad = await env.admin.get("/admin/pricing", params={"provider": "Not A Provider"})
    assert bad.status == 400


@pytest_twisted.ensureDeferred
async def test_overrides_set_apply_at_once_and_unset(env, db_url):
    pricing = env.components.pricing
    before = pricing.price("openai", "gpt-4o-mini", Usage(1000, 100, 1100, None, None, "provider"))
    assert before.cost_usd == Decimal("0.00021")  # 1000 x 0.15 + 100 x 0.6
    put = await env.admin.put("/admin/pricing", mini(note="negotiated"))
    assert put.status == 200, put.body
    doc = put.json
    assert (doc["source"], doc["input"], doc["output"], doc["cached_input"]) == (
        "override",
        "1.5",
        "2",
        "0.5",
    )
    assert doc["catalogue"]["input"] == "0.15" and doc["note"] == "negotiated"
    # this node prices with it as soon as the call returns
    after = pricing.price(
        "openai", "gpt-4o-mini-2024-07-18", Usage(1000, 100, 1100, None, None, "provider")
    )
    assert after.cost_usd == Decimal("0.0017")  # 1000 x 1.5 + 100 x 2
    listed = (await env.admin.get("/admin/pricing", params={"provider": "openai"})).json
    [row] = [p for p in listed["items"] if p["model"] == "gpt-4o-mini"]
    assert row["source"] == "override" and row["updated_at"]
    stored = admin_execute(db_url, "SELECT prices FROM price_overrides")
    assert stored == [
        (
            {
                "input": "1.5",
                "output": "2",
                "cached_input": "0.5",
                "checked": "2026-01-02",
                "note": "negotiated",
            },
        )
    ]
    # a custom provider's model
    custom = {"provider": "vllm-local", "model": "Llama-3-8B", "input": 0, "output": 0,
              "checked": "2026-01-02", "max_output_tokens": 8192}  # fmt: skip
    assert (await env.admin.put("/admin/pricing", custom)).json["model"] == "llama-3-8b"
    free = pricing.price("vllm-local", "llama-3-8b", Usage(5, 5, 10, None, None, "provider"))
    assert free.cost_usd == 0 and free.basis is not None

    gone = await env.admin.delete("/admin/pricing?provider=openai&model=gpt-4o-mini")
    assert gone.status == 204
    assert pricing.price(
        "openai", "gpt-4o-mini", Usage(1000, 100, 1100, None, None, "provider")
    ).cost_usd == Decimal("0.00021")
    again = await env.admin.delete("/admin/pricing?provider=openai&model=gpt-4o-mini")
    assert again.status == 404
    assert (await env.admin.delete("/admin/pricing?provider=openai")).status == 400


@pytest_twisted.ensureDeferred
async def test_bad_prices_are_refused_with_a_reason(env, db_url):
    cases = [
        ({"output": None}, "output"),
        ({"input": -1}, "input"),
        ({"input": "0.0000001"}, "decimals"),
        ({"input": "cheap"}, "number"),
        ({"input": True}, "input"),
        ({"checked": "last week"}, "checked"),
        ({"colour": "red"}, "colour"),
        ({"long_context": {"input": 1, "output": 2}}, "threshold"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"provider": "Open AI"}, "provider"),
        ({"model": "gpt 4"}, "model"),
    ]
    for change, word in cases:
        body = {k: v for k, v in {**mini(), **change}.items() if v is not None}
        answer = await env.admin.put("/admin/pricing", body)
        assert answer.status == 400, (change, answer.body)
        assert word in answer.json["error"]["message"], (change, answer.json)
    assert admin_execute(db_url, "SELECT count(*) FROM price_overrides") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_request_explained(env):
    org = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    record = UsageRecord(
        request_id=str(uuid.uuid4()),
        created_at=datetime(2025, 3, 1, 12, tzinfo=UTC),
        org_id=org,
        key_id=None,
        provider="openai",
        model="o4-mini",
        method="POST",
        path="/v1/responses",
        status=200,
        latency_ms=12.5,
        ttfb_ms=3.0,
        streamed=False,
        usage=Usage(100, 500, 600, 64, None, "provider", 448, None, raw='{"input_tokens":100}'),
    )
    priced = env.components.pricing.price_record(record)
    await RequestLogStore(env.components.database).insert([priced])
    doc = (await env.admin.get(f"/admin/requests/{record.request_id}")).json
    # o4-mini 1.10 / 0.275 / 4.40: 36 x 1.1 + 64 x 0.275 + 500 x 4.4 = 39.6 + 17.6 + 2200
    assert doc["request"]["cost_usd"] == doc["total_usd"] == "0.0022572"
    assert doc["matches"] is True and doc["estimated"] is False
    assert [(line["kind"], line["tokens"], line["cost_usd"]) for line in doc["lines"]] == [
        ("input", 36, "0.0000396"),
        ("cached_input", 64, "0.0000176"),
        ("output", 500, "0.0022"),
    ]
    assert doc["request"]["reasoning_tokens"] == 448
    assert doc["usage_raw"] == '{"input_tokens":100}'
    assert doc["pricing"]["model"] == "o4-mini" and doc["pricing"]["tier"] == "base"
    assert (await env.admin.get(f"/admin/requests/{uuid.uuid4()}")).status == 404
    assert (await env.admin.get("/admin/requests/not-a-uuid")).status == 404
    # another org's member cannot see it; the org's member can
    bob = env.user("auth0|bob")
    assert (await bob.get(f"/admin/requests/{record.request_id}")).status == 404


@pytest_twisted.ensureDeferred
async def test_a_price_change_reaches_every_node_within_a_second(database, db_url):
    nodes, listeners = [], []
    for _ in range(2):
        listener = ChangeListener(
            db_url, reactor=reactor, ping_interval=0.2, min_backoff=0.05, max_backoff=0.2
        )
        await listener.startService()
        listeners.append(listener)
        node = PricingManager(
            PricingStore(database), reactor=reactor, metrics=Registry(), listener=listener
        )
        await node.start()
        nodes.append(node)
    a, b = nodes
    usage = Usage(1_000_000, 0, 1_000_000, None, None, "provider")
    try:
        assert b.price("openai", "gpt-4o", usage).cost_usd == Decimal("2.5")
        started = reactor.seconds()
        await a.set_price("openai", "gpt-4o", {"input": 2, "output": 8, "checked": "2026-01-01"})
        while b.price("openai", "gpt-4o", usage).cost_usd != 2:
            assert reactor.seconds() - started < 1.0, "not applied within a second"
            await deferLater(reactor, 0.005)
        print(f"price change applied on another node {(reactor.seconds() - started) * 1000:.0f} ms")
        # a change made while a node was not listening: reloaded after the reconnect
        admin_execute(
            db_url,
            'UPDATE price_overrides SET prices = prices || \'{"input": "3"}\'::jsonb',
        )
        admin_execute(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'lectr-listener' AND datname = current_database()",
        )
        while b.price("openai", "gpt-4o", usage).cost_usd != 3:
            assert reactor.seconds() - started < 10.0, "not reloaded after a reconnect"
            await deferLater(reactor, 0.01)
    finally:
        for node in nodes:
            await node.stop()
        for listener in listeners:
            listener.stopService()
