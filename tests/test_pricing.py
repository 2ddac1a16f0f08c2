"""Prices and the cost of a request, without a database: the shipped
catalogue, model resolution, and the arithmetic of every kind of usage
against hand-computed values."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.limits.model import to_micro
from lectr.metrics import Registry
from lectr.pricing.catalogue import (
    PriceError,
    PriceTable,
    candidates,
    check_rate,
    load_catalogue,
    parse_catalogue,
    parse_entry,
)
from lectr.pricing.cost import (
    UNMETERED,
    breakdown,
    cost_of,
    estimate_prompt_tokens,
    format_usd,
    with_estimates,
    worst_case,
)
from lectr.pricing.manager import RESOLVE_CACHE_MAX, PricingManager
from lectr.usage.meters import anthropic_usage, openai_usage
from lectr.usage.model import NOTHING_RELAYED, Usage, UsageRecord

D = Decimal


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue()


@pytest.fixture(scope="module")
def shared_pricing(catalogue):
    return PricingManager(None, reactor=None, metrics=Registry(), catalogue=catalogue)


@pytest.fixture
def pricing(catalogue):
    metrics = Registry()
    manager = PricingManager(None, reactor=None, metrics=metrics, catalogue=catalogue)
    manager.metrics = metrics
    return manager


def usage(prompt=None, completion=None, cached=None, writes=None, source="provider", **kw):
    total = prompt + completion if prompt is not None and completion is not None else None
    return Usage(prompt, completion, total, cached, writes, source, **kw)


# --- the table test: every kind of usage, computed by hand ----------------------------------
#
# Each case: provider, request model, usage, request bytes, the expected cost, estimated.
# The arithmetic in the comment is tokens x USD per million / 1,000,000.

CASES = {
    "openai plain": (
        # gpt-4o 2.50 / 10: 1000 x 2.5 + 500 x 10 = 2500 + 5000 = 7500 µ$
        ("openai", "gpt-4o", usage(1000, 500), 0, "0.0075", False)
    ),
    "openai cached tokens are inside prompt_tokens": (
        # 400 fresh x 2.5 + 600 cached x 1.25 + 500 x 10 = 1000 + 750 + 5000
        ("openai", "gpt-4o", usage(1000, 500, cached=600), 0, "0.00675", False)
    ),
    "openai reasoning is inside completion_tokens": (
        # o4-mini 1.10 / 4.40: 100 x 1.1 + 500 x 4.4 = 110 + 2200 (not 448 more)
        (
            "openai",
            "o4-mini",
            openai_usage(
                {
                    "prompt_tokens": 100,
                    "completion_tokens": 500,
                    "total_tokens": 600,
                    "completion_tokens_details": {"reasoning_tokens": 448},
                }
            ),
            0,
            "0.00231",
            False,
        )
    ),
    "xai reasoning beside completion_tokens": (
        # grok-3-mini 0.30 / 0.50: 10 x 0.3 + (20 + 300) x 0.5 = 3 + 160
        (
            "xai",
            "grok-3-mini",
            openai_usage(
                {
                    "prompt_tokens": 10,
                    "completion_tokens": 20,
                    "total_tokens": 330,
                    "completion_tokens_details": {"reasoning_tokens": 300},
                }
            ),
            0,
            "0.000163",
            False,
        )
    ),
    "deepseek cache hits": (
        # 0.28 / 0.028 / 0.42: 100 x 0.28 + 900 x 0.028 + 100 x 0.42 = 28 + 25.2 + 42
        (
            "deepseek",
            "deepseek-chat",
            openai_usage(
                {
                    "prompt_tokens": 1000,
                    "completion_tokens": 100,
                    "total_tokens": 1100,
                    "prompt_cache_hit_tokens": 900,
                    "prompt_cache_miss_tokens": 100,
                }
            ),
            0,
            "0.0000952",
            False,
        )
    ),
    "anthropic cache read and writes by TTL": (
        # sonnet 4.5 3 / 15, read 0.30, write 3.75 (5m) / 6 (1h):
        # 10 x 3 + 100 x 0.3 + 100 x 3.75 + 200 x 6 + 5 x 15 = 30 + 30 + 375 + 1200 + 75
        (
            "anthropic",
            "claude-sonnet-4-5-20250929",
            anthropic_usage(
                {
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 300,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": 100,
                        "ephemeral_1h_input_tokens": 200,
                    },
                }
            ),
            0,
            "0.00171",
            False,
        )
    ),
    "anthropic plain cache writes are 5-minute writes": (
        # 10 x 3 + 300 x 3.75 + 5 x 15 = 30 + 1125 + 75
        (
            "anthropic",
            "claude-sonnet-4-5",
            anthropic_usage(
                {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 300}
            ),
            0,
            "0.00123",
            False,
        )
    ),
    "anthropic long context: the whole request at the premium rates": (
        # prompt 150,000 + 60,000 read = 210,000 > 200,000:
        # 150000 x 6 + 60000 x 0.6 + 1000 x 22.5 = 900000 + 36000 + 22500
        (
            "anthropic",
            "claude-sonnet-4",
            anthropic_usage(
                {"input_tokens": 150_000, "output_tokens": 1000, "cache_read_input_tokens": 60_000}
            ),
            0,
            "0.9585",
            False,
        )
    ),
    "anthropic exactly at the threshold: base rates": (
        # 140000 x 3 + 60000 x 0.3 + 1000 x 15 = 420000 + 18000 + 15000
        (
            "anthropic",
            "claude-sonnet-4",
            anthropic_usage(
                {"input_tokens": 140_000, "output_tokens": 1000, "cache_read_input_tokens": 60_000}
            ),
            0,
            "0.453",
            False,
        )
    ),
    "gemini long context": (
        # 2.5 pro past 200K: 250000 x 2.5 + 1000 x 15 = 625000 + 15000
        ("gemini", "gemini-2.5-pro", usage(250_000, 1000), 0, "0.64", False)
    ),
    "embeddings: prompt only": (
        # 1000 x 0.02
        (
            "openai",
            "text-embedding-3-small",
            Usage(1000, None, 1000, None, None, "provider"),
            0,
            "0.00002",
            False,
        )  # fmt: skip
    ),
    "azure: priced by the served model, as OpenAI": (
        (
            "azure",
            "my-deployment",
            usage(1000, 500, model="gpt-4o-2024-08-06"),
            0,
            "0.0075",
            False,
        )  # fmt: skip
    ),
    "the served model wins over the requested one": (
        # gpt-4o-mini 0.15 / 0.60: 1000 x 0.15 + 500 x 0.6 = 150 + 300
        (
            "openai",
            "gpt-4o",
            usage(1000, 500, model="gpt-4o-mini-2024-07-18"),
            0,
            "0.00045",
            False,
        )  # fmt: skip
    ),
    "openrouter: the vendor's price": (
        ("openrouter", "anthropic/claude-sonnet-4.5", usage(1000, 100), 0, "0.0045", False)
    ),
    "a cut stream: the prompt from the request's size": (
        # ceil(4001 / 4) = 1001 prompt tokens: 1001 x 0.15 + 10 x 0.6 = 150.15 + 6
        (
            "openai",
            "gpt-4o-mini",
            Usage(completion_tokens=10, source="estimated"),
            4001,
            "0.00015615",
            True,
        )  # fmt: skip
    ),
    "a hang-up before any answer: the prompt alone": (
        # 400 bytes: 100 tokens x 2.5
        ("openai", "gpt-4o", NOTHING_RELAYED, 400, "0.00025", True)
    ),
    "an anthropic stream cut after message_start: its prompt, estimated output": (
        # 20 x 3 + 4 read x 0.3... (message_start said input 10, read 4, write 6):
        # 10 x 3 + 4 x 0.3 + 6 x 3.75 + 2 x 15 = 30 + 1.2 + 22.5 + 30
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(20, 2, 22, 4, 6, "estimated"),
            9999,
            "0.0000837",
            True,
        )  # fmt: skip
    ),
    "counts that contradict each other never go negative": (
        # 1500 cached of a 1000 prompt: fresh 0; 1500 x 1.25 + 0
        ("openai", "gpt-4o", usage(1000, 0, cached=1500), 0, "0.001875", False)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cost_of_every_kind_of_usage(pricing, name):
    provider, model, u, request_bytes, expected, estimated = CASES[name]
    priced = pricing.price(provider, model, u, request_bytes=request_bytes)
    assert priced.cost_usd == D(expected), name
    assert isinstance(priced.cost_usd, Decimal)
    assert priced.estimated is estimated
    assert priced.basis is not None and priced.reason is None
    # the stored explanation gives the same figure, line by line
    lines, total = _explain(priced, u, request_bytes)
    assert total == priced.cost_usd
    assert sum((line.cost for line in lines), D(0)) == total


def _explain(priced, u, request_bytes):
    basis = json.loads(priced.basis.json)
    prompt = u.prompt_tokens
    if prompt is None:
        prompt = priced.prompt_estimate or 0
    return breakdown(
        {k: D(v) for k, v in basis["rates"].items()},
        prompt_tokens=prompt,
        cached_tokens=u.cached_tokens or 0,
        cache_creation_tokens=u.cache_creation_tokens or 0,
        cache_creation_1h_tokens=u.cache_creation_1h_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
    )


def test_the_basis_names_the_prices_used(pricing):
    priced = pricing.price("anthropic", "claude-sonnet-4", usage(210_000, 10))
    basis = json.loads(priced.basis.json)
    assert basis == {
        "provider": "anthropic",
        "model": "claude-sonnet-4",
        "source": "catalogue",
        "checked": "2025-10-01",
        "tier": "long_context",
        "threshold": 200000,
        "rates": {
            "input": "6",
            "output": "22.5",
            "cached_input": "0.6",
            "cache_write_5m": "7.5",
            "cache_write_1h": "12",
        },
    }
    assert priced.tier == "long_context"
    # a basis is named by its content, the same on every node
    again = pricing.price("anthropic", "claude-sonnet-4-20250514", usage(300_000, 1))
    assert again.basis == priced.basis


def test_unpriced_is_none_never_zero(pricing):
    unknown = pricing.price("openai", "gpt-9-ultra", usage(10, 10))
    assert (unknown.cost_usd, unknown.reason, unknown.basis) == (None, "unknown_model", None)
    nameless = pricing.price("openai", None, usage(10, 10))
    assert (nameless.cost_usd, nameless.reason) == (None, "no_model")
    counted = pricing.metrics.get("lectr_unpriced_requests_total")
    assert counted.value("openai") == 2
    # no usage at all: nothing to price (and not an unpriced model)
    assert pricing.price("openai", "gpt-4o", Usage()) is UNMETERED
    # a hang-up of unknown size with nothing relayed: unknown, not zero
    nothing = pricing.price("openai", "gpt-4o", NOTHING_RELAYED, request_bytes=0)
    assert (nothing.cost_usd, nothing.reason) == (None, "no_usage")
    assert counted.value("openai") == 2


def test_estimated_prompt_lands_in_the_row(pricing):
    record = UsageRecord(
        request_id="00000000-0000-4000-8000-000000000001",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        org_id="00000000-0000-4000-8000-000000000002",
        key_id=None,
        provider="openai",
        model="gpt-4o-mini",
        method="POST",
        path="/v1/chat/completions",
        status=499,
        latency_ms=1.0,
        ttfb_ms=None,
        streamed=True,
        usage=Usage(completion_tokens=10, source="estimated"),
        request_bytes=4001,
    )
    priced = with_estimates(pricing.price_record(record))
    assert priced.cost_usd == D("0.00015615")
    assert (priced.usage.prompt_tokens, priced.usage.total_tokens) == (1001, 1011)
    assert priced.usage.source == "estimated"
    # a provider's own count is never replaced
    exact = with_estimates(pricing.price_record(replace(record, usage=usage(7, 10))))
    assert exact.usage.prompt_tokens == 7


def test_estimate_prompt_tokens_rounds_up():
    assert [estimate_prompt_tokens(n) for n in (0, 1, 4, 5, -3)] == [0, 1, 1, 2, 0]


# --- worst case (budget reservations) ------------------------------------------------------


def test_worst_case(pricing, catalogue):
    # sonnet 4.5: every prompt token at the dearest prompt rate (1-hour write, 6), the
    # request's output limit at 15: 1000 x 6 + 100 x 15 = 6000 + 1500
    assert pricing.worst_case_usd(
        "anthropic", "claude-sonnet-4-5", prompt_tokens=1000, max_output_tokens=100
    ) == D("0.0075")
    # no limit in the request: the model's (64,000): 6000 + 960000
    assert pricing.worst_case_usd(
        "anthropic", "claude-sonnet-4-5", prompt_tokens=1000, max_output_tokens=None
    ) == D("0.966")
    # past the long-context threshold: 300000 x 12 + 10 x 22.5
    assert pricing.worst_case_usd(
        "anthropic", "claude-sonnet-4-5", prompt_tokens=300_000, max_output_tokens=10
    ) == D("3.600225")
    # OpenAI: no cache writes, the input rate is the dearest; gpt-4o may be served at
    # its priority tier (4.25 / 17), so that is the worst case: 1000 x 4.25 + 16384 x 17
    assert pricing.worst_case_usd(
        "openai", "gpt-4o-2024-11-20", prompt_tokens=1000, max_output_tokens=None
    ) == D("0.282778")
    # a model without tiers: its base rates (1000 x 5 + 4096 x 15)
    assert pricing.worst_case_usd(
        "openai", "gpt-4o-2024-05-13", prompt_tokens=1000, max_output_tokens=None
    ) == D("0.066440")
    # embeddings: free output, no limit needed
    assert pricing.worst_case_usd(
        "openai", "text-embedding-3-large", prompt_tokens=1000, max_output_tokens=None
    ) == D("0.00013")
    assert pricing.worst_case_usd("openai", "gpt-9", prompt_tokens=1, max_output_tokens=1) is None
    assert pricing.worst_case_usd("openai", None, prompt_tokens=1, max_output_tokens=1) is None
    # an entry without an output limit, and a request without one: unbounded
    entry = parse_entry(
        "custom", "m", {"input": 1, "output": 2, "checked": "2025-01-01"}, source="override"
    )
    assert worst_case(entry, 10, None) is None
    assert worst_case(entry, 10, 5) == D("0.00002")


class Target(NamedTuple):
    provider: str
    model: str | None


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    model=st.sampled_from(
        ["claude-sonnet-4-5", "gpt-4o-2024-11-20", "text-embedding-3-large", "gpt-4o-mini"]
    ),
    prompt=st.integers(min_value=-5, max_value=2_000_000),
    limit=st.none() | st.integers(min_value=-5, max_value=1_000_000),
)
def test_worst_case_micro_is_the_usd_figure_rounded_up(pricing, model, prompt, limit):
    # the proxy reserves worst_case_micro (integers only): always the Decimal
    # worst case in whole micro-dollars, rounded up, never short
    provider = "anthropic" if model.startswith("claude") else "openai"
    usd = pricing.worst_case_usd(provider, model, prompt_tokens=prompt, max_output_tokens=limit)
    micro = pricing.worst_case_micro(provider, model, prompt_tokens=prompt, max_output_tokens=limit)
    assert micro == (None if usd is None else to_micro(usd))
    if micro is not None:
        assert D(micro) / 1_000_000 >= usd > D(micro - 1) / 1_000_000
    # a plan's reservation: the dearest of its targets, the unpriced ones skipped
    others = [("openai", "gpt-4o"), ("openai", "no-such-model"), ("anthropic", None)]
    targets = [Target(p, m) for p, m in [(provider, model), *others]]
    each = [
        pricing.worst_case_micro(p, m, prompt_tokens=prompt, max_output_tokens=limit)
        for p, m in [(provider, model), *others]
    ]
    priced = [x for x in each if x is not None]
    assert pricing.dearest_micro(targets, prompt_tokens=prompt, max_output_tokens=limit) == (
        max(priced) if priced else None
    )
    assert (
        pricing.dearest_micro(targets[1:3], prompt_tokens=prompt, max_output_tokens=limit)
        == (each[1])
    )


# --- the catalogue ----------------------------------------------------------------------------


BUILT_IN = (
    "openai",
    "anthropic",
    "gemini",
    "mistral",
    "groq",
    "deepseek",
    "xai",
    "together",
    "fireworks",
)


def test_the_shipped_catalogue(catalogue):
    providers = {e.provider for e in catalogue.entries}
    assert set(BUILT_IN) <= providers
    assert catalogue.prices_as == {"azure": "openai"}
    assert set(catalogue.vendor_prefixes["openrouter"].values()) <= providers
    for e in catalogue.entries:
        assert date(2025, 1, 1) <= e.checked <= date.today(), e
        assert e.rates.input >= 0 and e.rates.output >= 0
        if e.rates.output:  # (embeddings produce nothing)
            assert e.max_output_tokens, e
        if e.provider == "anthropic" and e.model != "claude-3-haiku":
            # cache writes 1.25x / 2x, reads 0.1x the input rate (Claude 3 Haiku's page
            # rounds them: 0.30 / 0.50 / 0.03)
            assert e.rates.cache_write_5m == e.rates.input * D("1.25"), e
            assert e.rates.cache_write_1h == e.rates.input * 2, e
            assert e.rates.cached_input == e.rates.input / 10, e


@pytest.mark.parametrize(
    "provider, model, listed",
    [
        ("openai", "gpt-4o-2024-08-06", ("openai", "gpt-4o")),
        ("openai", "gpt-4o-2024-05-13", ("openai", "gpt-4o-2024-05-13")),  # listed: its own
        ("openai", "GPT-4o-Mini-2024-07-18", ("openai", "gpt-4o-mini")),
        ("openai", "gpt-4-0613", ("openai", "gpt-4")),
        ("openai", "gpt-4-0125-preview", ("openai", "gpt-4-0125-preview")),
        ("openai", "gpt-4-turbo-2024-04-09", ("openai", "gpt-4-turbo")),
        ("openai", "o1-preview", ("openai", "o1")),
        ("openai", "gpt-4o-audio-preview", None),  # not the text model's prices
        ("openai", "gpt-4o-realtime-preview-2024-12-17", None),
        ("openai", "gpt-4o-search-preview", None),
        ("anthropic", "claude-opus-4-1-20250805", ("anthropic", "claude-opus-4-1")),
        ("anthropic", "claude-opus-4-20250514", ("anthropic", "claude-opus-4")),
        ("anthropic", "claude-3-5-sonnet-latest", ("anthropic", "claude-3-5-sonnet")),
        ("anthropic", "claude-3-5-haiku-20241022", ("anthropic", "claude-3-5-haiku")),
        ("gemini", "gemini-2.5-pro-preview-06-05", ("gemini", "gemini-2.5-pro")),
        ("gemini", "gemini-2.0-flash-001", ("gemini", "gemini-2.0-flash")),
        ("mistral", "mistral-large-2411", ("mistral", "mistral-large")),
        ("mistral", "mistral-small-latest", ("mistral", "mistral-small")),
        ("xai", "grok-4-0709", ("xai", "grok-4")),
        ("azure", "gpt-4.1-mini-2025-04-14", ("openai", "gpt-4.1-mini")),
        ("azure", "gpt-35-turbo", ("azure", "gpt-35-turbo")),
        # legacy gpt-3.5 snapshots have prices of their own, not gpt-3.5-turbo's
        ("openai", "gpt-3.5-turbo-1106", ("openai", "gpt-3.5-turbo-1106")),
        ("openai", "gpt-3.5-turbo-0613", ("openai", "gpt-3.5-turbo-0613")),
        ("openai", "gpt-3.5-turbo-0125", ("openai", "gpt-3.5-turbo")),
        ("openai", "gpt-3.5-turbo-16k-0613", ("openai", "gpt-3.5-turbo-16k")),
        ("openai", "gpt-3.5-turbo-instruct-0914", ("openai", "gpt-3.5-turbo-instruct")),
        ("openai", "gpt-4-32k-0613", ("openai", "gpt-4-32k")),
        ("openrouter", "openai/gpt-4o", ("openai", "gpt-4o")),
        ("openrouter", "google/gemini-2.5-flash", ("gemini", "gemini-2.5-flash")),
        ("openrouter", "meta-llama/llama-3-70b", None),
        (
            "together",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            ("together", "meta-llama/llama-3.3-70b-instruct-turbo"),
        ),  # fmt: skip
        ("openai", "claude-sonnet-4-5", None),  # another provider's model
        ("nobody", "gpt-4o", None),
    ],
)
def test_resolution(catalogue, provider, model, listed):
    entry = PriceTable(catalogue).lookup(provider, model)
    assert ((entry.provider, entry.model) if entry else None) == listed


def test_snapshot_candidates_most_specific_first():
    assert list(candidates("claude-3-5-sonnet-20241022-v2:0")) == [
        "claude-3-5-sonnet-20241022-v2:0",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-sonnet",
    ]
    assert list(candidates("Claude-Sonnet-4.5")) == ["claude-sonnet-4.5", "claude-sonnet-4-5"]


def test_overrides_replace_and_add(catalogue):
    override = parse_entry(
        "openai",
        "gpt-4o",
        {"input": "2", "output": "8", "checked": "2026-01-02"},
        source="override",
    )
    custom = parse_entry(
        "vllm-local", "Llama-3-8B", {"input": 0, "output": 0, "checked": "2026-01-02"},
        source="override",
    )  # fmt: skip
    table = PriceTable(catalogue, [override, custom])
    assert table.lookup("openai", "gpt-4o-2024-08-06") is override
    # a more specific catalogue entry still wins for its own name
    assert table.lookup("openai", "gpt-4o-2024-05-13").source == "catalogue"
    assert table.lookup("vllm-local", "llama-3-8b") is custom
    assert cost_of(custom, usage(1000, 1000)).cost_usd == 0  # free is priced: 0, not unpriced


@pytest.mark.parametrize(
    "value",
    [-1, "-0.5", "1e400", "NaN", "Infinity", "0.0000001", True, None, [], {}, "abc", "", 10**7],
)
def test_bad_rates_are_refused(value):
    with pytest.raises(PriceError):
        check_rate(value, "input")


@pytest.mark.parametrize("value", [0, 3, "3.75", 0.1, "0.000001", D("12.5")])
def test_good_rates(value):
    assert check_rate(value, "input") == D(str(value))


@pytest.mark.parametrize(
    "doc",
    [
        {"input": 1, "checked": "2025-01-01"},  # no output
        {"input": 1, "output": 1},  # no date
        {"input": 1, "output": 1, "checked": "yesterday"},
        {"input": 1, "output": 1, "checked": "2025-01-01", "colour": "red"},
        {"input": 1, "output": 1, "checked": "2025-01-01", "max_output_tokens": 0},
        {"input": 1, "output": 1, "checked": "2025-01-01", "long_context": {"input": 2}},
        {"input": 1, "output": 1, "checked": "2025-01-01", "long_context": {"threshold": 5}},
        {"input": 1, "output": 1, "checked": "2025-01-01", "note": "x" * 501},
        "cheap",
    ],
)
def test_bad_entries_are_refused(doc):
    with pytest.raises(PriceError):
        parse_entry("openai", "m", doc, source="override")


@pytest.mark.parametrize("provider", ["", "OpenAI", "a b", "x" * 65, "../etc", None])
def test_bad_providers_are_refused(provider):
    with pytest.raises(PriceError):
        parse_entry(provider, "m", {"input": 1, "output": 1, "checked": "2025-01-01"}, source="o")


@pytest.mark.parametrize("model", ["", " ", "a b", "m\x00", "x" * 257, 7])
def test_bad_models_are_refused(model):
    with pytest.raises(PriceError):
        parse_entry("openai", model, {"input": 1, "output": 1, "checked": "2025-01-01"}, source="o")


def test_a_malformed_catalogue_names_the_entry():
    with pytest.raises(PriceError, match=r"openai.*'m'.*decimals"):
        parse_catalogue(
            '[models.openai."m"]\ninput = 0.1234567\noutput = 1\nchecked = 2025-01-01\n'
        )


# --- hostile model names: a class, not a string ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(model=st.text(max_size=300), provider=st.sampled_from(["openai", "openrouter", "azure"]))
def test_any_model_name_prices_or_not_without_failing(shared_pricing, model, provider):
    priced = shared_pricing.price(provider, model, usage(10, 10))
    assert priced.cost_usd is None or priced.cost_usd >= 0
    assert len(shared_pricing._cache) <= RESOLVE_CACHE_MAX


def test_the_resolution_cache_is_bounded(pricing):
    for i in range(RESOLVE_CACHE_MAX + 10):
        pricing.price("openai", f"made-up-{i}", usage(1, 1))
    assert len(pricing._cache) <= RESOLVE_CACHE_MAX


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.integers(0, 2**31 - 1),
    completion=st.integers(0, 2**31 - 1),
    cached=st.integers(0, 2**31 - 1),
    writes=st.integers(0, 2**31 - 1),
    writes_1h=st.integers(0, 2**31 - 1),
    model=st.sampled_from(["claude-sonnet-4", "claude-3-haiku"]),
)
def test_the_explanation_always_adds_up_to_the_cost(
    shared_pricing, prompt, completion, cached, writes, writes_1h, model
):
    u = Usage(prompt, completion, None, cached, writes, "provider", None, writes_1h)
    priced = shared_pricing.price("anthropic", model, u)
    lines, total = _explain(priced, u, 0)
    assert total == priced.cost_usd
    assert "E" not in format_usd(priced.cost_usd)  # plain fixed-point text
    # what the limits are charged: the same cost in whole micro-dollars, rounded up
    assert priced.cost_micro == to_micro(priced.cost_usd)


def test_format_usd():
    assert [format_usd(D(x)) for x in ("0", "1.2300", "1E-10", "12", "0.0000425")] == [
        "0",
        "1.23",
        "0.0000000001",
        "12",
        "0.0000425",
    ]
    assert format_usd(None) is None


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(),
        st.decimals(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_any_rate_is_exact_or_refused(value):
    try:
        rate = check_rate(value, "input")
    except PriceError:
        return
    assert isinstance(rate, Decimal) and rate.is_finite() and 0 <= rate < 1_000_000
    assert rate == rate.quantize(D("0.000001"))  # at most 6 decimals: exact integer arithmetic


def test_rates_are_held_with_one_exponent():
    assert str(check_rate("0E-1000000", "input")) == "0.000000"
    assert str(check_rate("1.5E+2", "input")) == "150.000000"
    assert format_usd(check_rate("3.50", "input")) == "3.5"
