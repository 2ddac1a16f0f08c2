"""Exact cost by service tier and server-side web search: the rates of the
tier the provider says served a request (``Usage.service_tier``), web
searches at an entry's rate per 1,000 (``Usage.web_search_requests``), the
basis naming both, the worst case of a budget reservation over every tier,
the entry's shape in prices.toml and in the admin document (refused with a
reason when malformed), ``lectr pricing`` and the admin API's round trip.
Every figure is computed by hand in the comment next to it (tokens x USD
per million / 1,000,000; searches x USD per 1,000 / 1,000)."""

from __future__ import annotations

import functools
import io
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.cli import EXIT_USAGE, CliError, Commands, Output, build_parser
from lectr.limits.model import to_micro
from lectr.metrics import Registry
from lectr.pricing.catalogue import PriceError, load_catalogue, parse_catalogue, parse_entry
from lectr.pricing.cost import Line, breakdown, cost_of, worst_case, worst_case_units
from lectr.pricing.manager import PricingManager, _stored, entry_json
from lectr.usage.model import Usage, UsageRecord, service_tier_of

D = Decimal
CHECKED = "2025-01-01"


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue()


@pytest.fixture(scope="module")
def pricing(catalogue):
    return PricingManager(None, reactor=None, metrics=Registry(), catalogue=catalogue)


def use(prompt, completion, cached=None, writes=None, tier=None, searches=None, **kw) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached,
        cache_creation_tokens=writes,
        source=kw.pop("source", "provider"),
        service_tier=tier,
        web_search_requests=searches,
        **kw,
    )


def entry(**doc):
    return parse_entry("custom", "m", {"checked": CHECKED, **doc}, source="override")


# --- service tiers: exact costs ---------------------------------------------------------------

# 1000 prompt tokens, 200 of them cached, and 500 completion tokens
TIERED = [
    # o3 flex 1 / 0.25 / 4: 800 x 1 + 200 x 0.25 + 500 x 4 = 800 + 50 + 2000
    ("openai", "o3", "flex", "0.00285"),
    # o3 priority 3.50 / 0.875 / 14: 2800 + 175 + 7000
    ("openai", "o3-2025-04-16", "priority", "0.009975"),
    # o3 base 2 / 0.5 / 8: 1600 + 100 + 4000, for every tier the entry does not list
    ("openai", "o3", None, "0.0057"),
    ("openai", "o3", "default", "0.0057"),
    ("openai", "o3", "scale", "0.0057"),
    ("openai", "o3", "auto", "0.0057"),
    ("openai", "o3", "standard", "0.0057"),
    ("openai", "o3", "batch", "0.0057"),
    ("openai", "o3", "FLEX", "0.0057"),  # (tiers are named as reported: no case folding)
    ("openai", "o3", "flex ", "0.0057"),
    # gpt-5 flex 0.625 / 0.0625 / 5: 500 + 12.5 + 2500
    ("openai", "gpt-5", "flex", "0.0030125"),
    # gpt-5 priority 2.50 / 0.25 / 20: 2000 + 50 + 10000
    ("openai", "gpt-5-2025-08-07", "priority", "0.01205"),
    # gpt-5-mini priority 0.45 / 0.045 / 3.60: 360 + 9 + 1800
    ("openai", "gpt-5-mini", "priority", "0.002169"),
    # gpt-5-nano flex 0.025 / 0.0025 / 0.20: 20 + 0.5 + 100
    ("openai", "gpt-5-nano", "flex", "0.0001205"),
    # o4-mini flex 0.55 / 0.1375 / 2.20: 440 + 27.5 + 1100
    ("openai", "o4-mini", "flex", "0.0015675"),
    # gpt-4o priority 4.25 / 2.125 / 17: 3400 + 425 + 8500
    ("openai", "gpt-4o-2024-08-06", "priority", "0.012325"),
    # gpt-4o lists no flex tier: base 2.5 / 1.25 / 10: 2000 + 250 + 5000
    ("openai", "gpt-4o", "flex", "0.00725"),
    # Azure is priced as OpenAI, tiers included: gpt-4.1-mini priority 0.70 / 0.175 / 2.80
    ("azure", "gpt-4.1-mini-2025-04-14", "priority", "0.001995"),
    # OpenRouter's openai/ models too (gpt-4.1 priority 3.50 / 0.875 / 14)
    ("openrouter", "openai/gpt-4.1", "priority", "0.009975"),
    # gpt-4.1-nano 0.20 / 0.05 / 0.80: 160 + 10 + 400; gpt-4o-mini 0.25 / 0.125 / 1
    ("openai", "gpt-4.1-nano", "priority", "0.00057"),
    ("openai", "gpt-4o-mini", "priority", "0.000725"),
]


@pytest.mark.parametrize("provider, model, tier, expected", TIERED)
def test_a_service_tier_is_priced_at_its_rates(pricing, provider, model, tier, expected):
    priced = pricing.price(provider, model, use(1000, 500, cached=200, tier=tier))
    assert priced.cost_usd == D(expected)
    basis = json.loads(priced.basis.json)
    listed = priced.entry.by_tier is not None and tier in priced.entry.by_tier
    assert priced.service_tier == (tier if listed else None)
    assert ("service_tier" in basis) is listed
    # the explanation from the stored basis gives the same figure
    lines, total = breakdown(
        {k: D(v) for k, v in basis["rates"].items()},
        prompt_tokens=1000,
        cached_tokens=200,
        cache_creation_tokens=0,
        cache_creation_1h_tokens=0,
        completion_tokens=500,
    )
    assert total == priced.cost_usd


def test_the_basis_names_the_service_tier(pricing):
    flex = pricing.price("openai", "o3", use(1000, 500, cached=200, tier="flex"))
    assert json.loads(flex.basis.json) == {
        "provider": "openai",
        "model": "o3",
        "source": "catalogue",
        "checked": "2025-08-07",
        "tier": "base",
        "threshold": None,
        "service_tier": "flex",
        "rates": {
            "input": "1",
            "output": "4",
            "cached_input": "0.25",
            "cache_write_5m": "1",  # (a cache write not given: the tier's input rate)
            "cache_write_1h": "1",
        },
    }
    assert (flex.tier, flex.service_tier) == ("base", "flex")
    base = pricing.price("openai", "o3", use(1000, 500, cached=200, tier="default"))
    assert base.service_tier is None and "service_tier" not in json.loads(base.basis.json)
    assert base.basis != flex.basis
    # the same tier's prices are the same basis, whatever the snapshot or the counts
    again = pricing.price("openai", "o3-2025-04-16", use(7, 1, tier="flex"))
    assert again.basis == flex.basis


# ids of untiered prices computed before tiers and web searches existed: stored rows
# keep naming the same price_bases rows
BASIS_IDS = [
    ("openai", "gpt-4o", 1000, 6250064490874905237),
    ("openai", "o3", 1000, 7066332523793351621),  # (o3 now lists tiers: its base is the same)
    ("openai", "gpt-5", 1000, 6930351282598042138),
    ("anthropic", "claude-sonnet-4-5", 1000, 7615092923024804052),
    ("anthropic", "claude-sonnet-4-5", 300_000, -8949181421249549688),
    ("anthropic", "claude-3-haiku", 1000, 3672604685980445287),
]


@pytest.mark.parametrize("provider, model, prompt, basis_id", BASIS_IDS)
@pytest.mark.parametrize("tier", [None, "default", "standard", "batch"])
@pytest.mark.parametrize("searches", [None, 0])
def test_untiered_bases_keep_their_ids(pricing, provider, model, prompt, basis_id, tier, searches):
    priced = pricing.price(provider, model, use(prompt, 10, tier=tier, searches=searches))
    assert priced.basis.id == basis_id


# --- a tier's own long context, and its cache rates ------------------------------------------

LAYERED = {
    "input": "0.5",
    "output": "1",
    "cached_input": "0.1",
    "long_context": {"threshold": 100, "input": "10", "output": "20"},
    "tiers": {
        "flex": {"input": "1", "output": "2"},
        "priority": {
            "input": "3",
            "output": "6",
            "long_context": {"threshold": 50, "input": "30", "output": "60"},
        },
    },
    "max_output_tokens": 1000,
}


@pytest.mark.parametrize(
    "tier, prompt, cached, expected_micro, kind",
    [
        # the base: 200 x 10 + 10 x 20 past its threshold (100)
        (None, 200, 0, 2200, "long_context"),
        # 80 x 0.5 + 20 x 0.1 + 10 x 1 below it
        (None, 100, 20, 52, "base"),
        # flex has no long context: the base one does not apply (200 x 1 + 10 x 2)
        ("flex", 200, 0, 220, "base"),
        # flex's cache reads at flex's input rate, not the base's cached_input
        ("flex", 200, 100, 220, "base"),
        # priority past its own threshold (50): 60 x 30 + 10 x 60
        ("priority", 60, 0, 2400, "long_context"),
        # a long-context cache rate not given: the tier's base one (its input, 3)
        ("priority", 60, 30, 30 * 30 + 30 * 3 + 600, "long_context"),
        # at its threshold: 50 x 3 + 10 x 6
        ("priority", 50, 0, 210, "base"),
    ],
)
def test_a_tier_prices_the_whole_request_with_its_own_long_context(
    tier, prompt, cached, expected_micro, kind
):
    e = entry(**LAYERED)
    priced = cost_of(e, use(prompt, 10, cached=cached or None, tier=tier))
    assert priced.cost_usd == D(expected_micro) / 1_000_000
    assert priced.tier == kind and priced.service_tier == tier
    threshold = json.loads(priced.basis.json)["threshold"]
    assert threshold == {"long_context": 50 if tier else 100, "base": None}[kind]
    assert e.tier_for(prompt, tier).basis == priced.basis


# --- web searches -----------------------------------------------------------------------------


def test_web_searches_at_the_entrys_rate(pricing):
    # sonnet 4.5: 1000 x 3 + 100 x 15 = 4500 µ$, and 3 searches x 10 / 1000 = 0.03
    priced = pricing.price("anthropic", "claude-sonnet-4-5", use(1000, 100, searches=3))
    assert priced.cost_usd == D("0.0345")
    assert priced.cost_micro == 34_500
    basis = json.loads(priced.basis.json)
    assert basis["rates"]["web_search"] == "10"
    plain = pricing.price("anthropic", "claude-sonnet-4-5", use(1000, 100))
    assert plain.cost_usd == D("0.0045") and "web_search" not in json.loads(plain.basis.json)
    del basis["rates"]["web_search"]
    assert basis == json.loads(plain.basis.json)  # the same prices, the search rate added
    # past the long-context threshold: 210000 x 6 + 10 x 22.5 + 1 search
    long = pricing.price("anthropic", "claude-sonnet-4-5", use(210_000, 10, searches=1))
    assert long.cost_usd == D("1.270225") and long.tier == "long_context"
    # a model without a search rate: the searches are not priced, the tokens are
    unpriced = pricing.price("openai", "gpt-4o", use(1000, 500, searches=5))
    assert unpriced.cost_usd == D("0.0075")
    assert unpriced.basis == pricing.price("openai", "gpt-4o", use(1000, 500)).basis
    # every Claude model in the table: 10 USD per 1,000
    claudes = [e for e in load_catalogue().entries if e.provider == "anthropic"]
    assert claudes and all(e.web_search == D(10) for e in claudes)


def test_web_searches_and_a_tier_together():
    e = entry(input=1, output=2, web_search="25", tiers={"priority": {"input": 2, "output": 4}})
    # 100 x 2 + 10 x 4 = 240 µ$, 4 searches x 25 / 1000 = 0.1
    priced = cost_of(e, use(100, 10, tier="priority", searches=4))
    assert priced.cost_usd == D("0.10024")
    basis = json.loads(priced.basis.json)
    assert (basis["service_tier"], basis["rates"]["web_search"]) == ("priority", "25")
    lines, total = breakdown(
        {k: D(v) for k, v in basis["rates"].items()},
        prompt_tokens=100,
        cached_tokens=0,
        cache_creation_tokens=0,
        cache_creation_1h_tokens=0,
        completion_tokens=10,
        web_search_requests=4,
    )
    assert total == priced.cost_usd
    assert lines[-1] == Line("web_search", 4, D(25), D("0.1"))
    assert lines[-1].to_json() == {
        "kind": "web_search",
        "searches": 4,
        "usd_per_thousand": "25",
        "cost_usd": "0.1",
    }
    # a basis without a search rate makes no search line (they were not priced)
    rates = {k: D(v) for k, v in basis["rates"].items() if k != "web_search"}
    lines, total = breakdown(
        rates,
        prompt_tokens=100,
        cached_tokens=0,
        cache_creation_tokens=0,
        cache_creation_1h_tokens=0,
        completion_tokens=10,
        web_search_requests=4,
    )
    assert [line.kind for line in lines] == ["input", "output"] and total == D("0.00024")


@settings(max_examples=300, deadline=None)
@given(
    rate_micro=st.integers(0, 10**12 - 1),  # every rate of at most 6 decimals below 1,000,000
    searches=st.integers(-3, 2**31 - 1),
    prompt=st.integers(0, 2**31 - 1),
)
@example(rate_micro=1, searches=1, prompt=0)  # 10^-9 USD: below a micro-dollar, kept exact
@example(rate_micro=999_999_999_999, searches=2**31 - 1, prompt=2**31 - 1)
def test_web_searches_are_exact(rate_micro, searches, prompt):
    rate = D(rate_micro).scaleb(-6)
    e = entry(input="0.000001", output=0, web_search=str(rate))
    priced = cost_of(e, use(prompt, 0, searches=searches))
    tokens = D(prompt) / 10**12  # 0.000001 USD per million
    charged = max(searches, 0)
    assert priced.cost_usd == tokens + D(charged) * rate / 1000
    assert priced.cost_micro == to_micro(priced.cost_usd)
    basis = json.loads(priced.basis.json)
    assert ("web_search" in basis["rates"]) is (charged > 0)
    _, total = breakdown(
        {k: D(v) for k, v in basis["rates"].items()},
        prompt_tokens=prompt,
        cached_tokens=0,
        cache_creation_tokens=0,
        cache_creation_1h_tokens=0,
        completion_tokens=0,
        web_search_requests=charged,
    )
    assert total == priced.cost_usd


# --- the worst case (budget reservations) -----------------------------------------------------


def test_the_worst_case_is_the_dearest_tier(pricing):
    # o3 may be served at priority (3.50 / 0.875 / 14): 1000 x 3.5 + 100 x 14
    assert pricing.worst_case_usd("openai", "o3", prompt_tokens=1000, max_output_tokens=100) == D(
        "0.0049"
    )
    e = entry(**LAYERED)
    # at or below the lowest threshold (priority's 50): the dearest base rates of every
    # table: 40 x 3 + 10 x 6
    assert worst_case(e, 40, 10) == D("0.00018")
    assert worst_case(e, 50, 10) == D("0.00021")
    # above it, every table's long-context rates too: 60 x 30 + 10 x 60
    assert worst_case(e, 60, 10) == D("0.0024")
    # an entry without tiers keeps its worst case as before tiers
    sonnet = pricing.resolve("anthropic", "claude-sonnet-4-5")
    assert sonnet.worst == (200000, 6_000_000, 15_000_000, 12_000_000, 22_500_000, 64000)


@functools.cache
def made_up(name: str):
    if name == "layered":
        return entry(**LAYERED)
    # a tier dearer than the base below the base's threshold, one with a lower threshold
    return entry(
        input=1,
        output=1,
        cache_write_1h=4,
        long_context={"threshold": 1000, "input": 2, "output": 2},
        tiers={
            "priority": {"input": 3, "output": 5, "cache_write_5m": 7},
            "flex": {
                "input": "0.5",
                "output": "0.5",
                "long_context": {"threshold": 10, "input": 9, "output": 9},
            },  # fmt: skip
        },
        max_output_tokens=5000,
    )


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["layered", "crossed", "o3", "gpt-4o", "claude-sonnet-4-5", "gpt-5"]),
    tier=st.sampled_from([None, "flex", "priority", "default", "standard", "scale"]),
    prompt=st.integers(0, 400_000),
    parts=st.tuples(st.integers(0, 400_000), st.integers(0, 400_000), st.integers(0, 400_000)),
    completion=st.integers(0, 200_000),
    limit=st.none() | st.integers(0, 200_000),
)
@example(name="crossed", tier="flex", prompt=11, parts=(0, 0, 0), completion=1, limit=1)
@example(name="crossed", tier="priority", prompt=1000, parts=(0, 1000, 0), completion=5, limit=5)
def test_the_worst_case_covers_every_tier(pricing, name, tier, prompt, parts, completion, limit):
    if name in ("layered", "crossed"):
        e = made_up(name)
    else:
        e = pricing.resolve("anthropic" if name.startswith("claude") else "openai", name)
    cap = limit if limit is not None else e.max_output_tokens
    completion = min(completion, cap)
    cached, writes, writes_1h = parts
    cached = min(cached, prompt)
    writes = min(writes, prompt - cached)
    writes_1h = min(writes_1h, writes)
    u = use(prompt, completion, cached, writes, tier, cache_creation_1h_tokens=writes_1h)
    exact = cost_of(e, u)
    worst = worst_case_units(e, prompt, limit)
    assert worst is not None
    assert worst >= exact.cost_usd.scaleb(12)


# --- the entry's shape: prices.toml and the admin document ------------------------------------


def test_tiers_read_the_same_from_toml_tables_inline_tables_and_json():
    sub_tables = parse_catalogue(
        '[models.openai."m"]\ninput = 2\noutput = 8\nchecked = 2025-01-01\nweb_search = 10\n'
        '[models.openai."m".tiers.flex]\ninput = 1\noutput = 4\ncached_input = 0.25\n'
        '[models.openai."m".tiers.priority]\ninput = 3.5\noutput = 14\n'
        '[models.openai."m".tiers.priority.long_context]\nthreshold = 9\ninput = 7\noutput = 28\n'
    ).entries[0]
    inline = parse_catalogue(
        '[models.openai."m"]\ninput = 2\noutput = 8\nchecked = 2025-01-01\nweb_search = 10\n'
        "tiers.flex = { input = 1, output = 4, cached_input = 0.25 }\n"
        "tiers.priority = { input = 3.5, output = 14, long_context = "
        "{ threshold = 9, input = 7, output = 28 } }\n"
    ).entries[0]
    admin = parse_entry("openai", "m", _stored(inline), source="catalogue")
    assert sub_tables == inline == admin
    assert [t.name for t in inline.tiers] == ["flex", "priority"]
    assert inline.web_search == D(10)
    assert entry_json(inline)["tiers"] == {
        "flex": {
            "input": "1",
            "output": "4",
            "cached_input": "0.25",
            "cache_write_5m": None,
            "cache_write_1h": None,
            "long_context": None,
        },
        "priority": {
            "input": "3.5",
            "output": "14",
            "cached_input": None,
            "cache_write_5m": None,
            "cache_write_1h": None,
            "long_context": {
                "threshold": 9,
                "input": "7",
                "output": "28",
                "cached_input": None,
                "cache_write_5m": None,
                "cache_write_1h": None,
            },
        },
    }
    assert entry_json(inline)["web_search"] == "10"
    assert _stored(inline)["tiers"] == {
        "flex": {"input": "1", "output": "4", "cached_input": "0.25"},
        "priority": {
            "input": "3.5",
            "output": "14",
            "long_context": {"threshold": 9, "input": "7", "output": "28"},
        },
    }
    # an entry without either shows nulls, and is stored as before
    plain = entry(input=1, output=2)
    assert (entry_json(plain)["tiers"], entry_json(plain)["web_search"]) == (None, None)
    assert _stored(plain) == {"input": "1", "output": "2", "checked": CHECKED}


BAD_DOCS = [
    ({"tiers": "cheap"}, "tiers must be an object"),
    ({"tiers": ["flex"]}, "tiers must be an object"),
    ({"tiers": {"Flex": {"input": 1, "output": 1}}}, "tiers.Flex"),
    ({"tiers": {"": {"input": 1, "output": 1}}}, "tiers.:"),
    ({"tiers": {"fl ex": {"input": 1, "output": 1}}}, "tiers.fl ex"),
    ({"tiers": {"flex\n": {"input": 1, "output": 1}}}, "service tier"),
    ({"tiers": {"x" * 33: {"input": 1, "output": 1}}}, "service tier"),
    ({"tiers": {"fl@x": {"input": 1, "output": 1}}}, "tiers.fl@x"),
    ({"tiers": {"flex": "half"}}, "tiers.flex must be an object"),
    ({"tiers": {"flex": {"input": 1}}}, "tiers.flex.output is required"),
    ({"tiers": {"flex": {"output": 1}}}, "tiers.flex.input is required"),
    ({"tiers": {"flex": {"input": -1, "output": 1}}}, "tiers.flex.input must be from 0"),
    ({"tiers": {"flex": {"input": "0.0000001", "output": 1}}}, "tiers.flex.input may have"),
    ({"tiers": {"flex": {"input": 1, "output": "free"}}}, "tiers.flex.output must be a number"),
    ({"tiers": {"flex": {"input": 1, "output": 1, "cached_input": True}}}, "tiers.flex.cached"),
    ({"tiers": {"flex": {"input": 1, "output": 1, "web_search": 1}}}, "unknown tiers.flex"),
    ({"tiers": {"flex": {"input": 1, "output": 1, "checked": CHECKED}}}, "unknown tiers.flex"),
    (
        {"tiers": {"flex": {"input": 1, "output": 1, "long_context": {"input": 1, "output": 1}}}},
        "tiers.flex.long_context.threshold",
    ),
    (
        {"tiers": {"flex": {"input": 1, "output": 1, "long_context": {"threshold": 9}}}},
        "tiers.flex.long_context.input is required",
    ),
    ({"tiers": {"flex": {"input": 1, "output": 1, "long_context": 9}}}, "tiers.flex.long_context"),
    ({"tiers": {f"t{i}": {"input": 1, "output": 1} for i in range(17)}}, "at most 16"),
    ({"web_search": -1}, "web_search must be from 0"),
    ({"web_search": "0.0000001"}, "web_search may have at most 6 decimals"),
    ({"web_search": True}, "web_search must be a number (USD per 1,000 web searches)"),
    ({"web_search": "ten"}, "web_search must be a number (USD per 1,000 web searches)"),
    ({"web_search": 10**7}, "web_search must be from 0"),
    ({"web_search": {"usd": 10}}, "web_search must be a number"),
]


@pytest.mark.parametrize("change, message", BAD_DOCS)
def test_a_bad_tier_or_search_rate_is_refused_naming_the_field(change, message):
    with pytest.raises(PriceError) as caught:
        entry(input=1, output=1, **change)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[models.openai."m".tiers.Flex]\ninput = 1\noutput = 1\n', "tiers.Flex"),
        ('[models.openai."m".tiers."fl ex"]\ninput = 1\noutput = 1\n', "tiers.fl ex"),
        ('[models.openai."m".tiers.flex]\ninput = 1\n', "tiers.flex.output is required"),
        (
            '[models.openai."m".tiers.flex]\ninput = 0.1234567\noutput = 1\n',
            "tiers.flex.input may have at most 6 decimals",
        ),
        ('[models.openai."m".tiers.flex]\ninput = -1\noutput = 1\n', "tiers.flex.input"),
        ('[models.openai."m".tiers.flex]\ninput = 1\noutput = 1\nnote = "x"\n', "tiers.flex"),
        ('[models.openai."m".tiers]\nflex = 0.5\n', "tiers.flex must be an object"),
        ('[models.openai."m".tiers.flex]\ninput = 1\noutput = 1\n[x]\n', None),  # fine
    ],
)
def test_a_bad_tier_in_prices_toml_names_the_entry_and_the_field(toml, message):
    head = '[models.openai."m"]\ninput = 2\noutput = 8\nchecked = 2025-01-01\n'
    if message is None:
        assert parse_catalogue(head + toml).entries[0].tiers[0].name == "flex"
        return
    with pytest.raises(PriceError) as caught:
        parse_catalogue(head + toml)
    assert "prices.toml [models.openai.'m']: " in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "line, message",
    [
        ('web_search = "ten"\n', "web_search must be a number (USD per 1,000 web searches)"),
        ("web_search = 0.0000001\n", "web_search may have at most 6 decimals"),
        ("web_search = -10\n", "web_search must be from 0"),
    ],
)
def test_a_bad_search_rate_in_prices_toml_is_refused(line, message):
    head = '[models.anthropic."m"]\ninput = 2\noutput = 8\nchecked = 2025-01-01\n'
    with pytest.raises(PriceError, match=r"anthropic.*'m'") as caught:
        parse_catalogue(head + line)
    assert message in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=40) | st.from_regex(r"[a-z0-9_-]{1,34}", fullmatch=True))
@example(name="priority")
@example(name="a" * 32)
@example(name="a" * 33)
def test_any_tier_name_is_the_guards_or_refused(name):
    try:
        e = entry(input=1, output=1, tiers={name: {"input": 2, "output": 2}})
    except PriceError as err:
        assert service_tier_of(name) is None
        assert "tiers." in str(err)
        return
    assert service_tier_of(name) == name
    assert cost_of(e, use(1000, 0, tier=name)).cost_usd == D("0.002")


# --- the shipped catalogue --------------------------------------------------------------------

FLEX = ("o3", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano")
PRIORITY = {
    "gpt-5": ("2.50", "0.25", "20.00"),
    "gpt-5-mini": ("0.45", "0.045", "3.60"),
    "o3": ("3.50", "0.875", "14.00"),
    "o4-mini": ("2.00", "0.50", "8.00"),
    "gpt-4.1": ("3.50", "0.875", "14.00"),
    "gpt-4.1-mini": ("0.70", "0.175", "2.80"),
    "gpt-4.1-nano": ("0.20", "0.05", "0.80"),
    "gpt-4o": ("4.25", "2.125", "17.00"),
    "gpt-4o-mini": ("0.25", "0.125", "1.00"),
}


def test_the_shipped_tiers(catalogue):
    by_name = {(e.provider, e.model): e for e in catalogue.entries}
    for model in FLEX:
        e = by_name[("openai", model)]
        flex = e.by_tier["flex"].base
        for kind in ("input", "output", "cached_input", "cache_write_5m", "cache_write_1h"):
            assert getattr(flex, kind) * 2 == getattr(e.base, kind), (model, kind)
    for model, (i, c, o) in PRIORITY.items():
        p = by_name[("openai", model)].by_tier["priority"].base
        assert (p.input, p.cached_input, p.output) == (D(i), D(c), D(o)), model
    tiered = {(e.provider, e.model) for e in catalogue.entries if e.tiers}
    assert tiered == {("openai", m) for m in (*FLEX, *PRIORITY)}
    for e in catalogue.entries:
        assert (e.web_search is not None) is (e.provider == "anthropic"), e.model


# --- lectr pricing (the CLI), without a server --------------------------------------------------


class FakeApi:
    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.calls: list[tuple] = []

    def put(self, path, body):
        self.calls.append(("PUT", path, body))
        return self.answer

    def get(self, path, **query):
        self.calls.append(("GET", path, query))
        return self.answer


def cli(answer: dict, *argv: str) -> tuple[FakeApi, str]:
    api, out = FakeApi(answer), io.StringIO()
    args = build_parser().parse_args(list(argv))
    getattr(Commands(api, Output(args.json, out)), args.handler)(args)
    return api, out.getvalue()


def _listed(**extra) -> dict:
    doc = entry_json(entry(input="1.5", output=2, **extra))
    return {**doc, "catalogue": None, "updated_at": None}


def test_pricing_set_sends_tiers_and_the_search_rate():
    api, out = cli(
        _listed(tiers={"flex": {"input": "0.75", "output": 1}}, web_search=10),
        "pricing", "set", "custom", "m", "--input", "1.5", "--output", "2",
        "--checked", "2026-01-02",
        "--tier", "flex:input=0.75,output=1",
        "--tier", "priority:input=3, output=4 ,cached_input=0.5,cache_write_1h=9",
        "--web-search", "10",
    )  # fmt: skip
    [(method, path, body)] = api.calls
    assert (method, path) == ("PUT", "/admin/pricing")
    assert body == {
        "provider": "custom",
        "model": "m",
        "input": "1.5",
        "output": "2",
        "checked": "2026-01-02",
        "tiers": {
            "flex": {"input": "0.75", "output": "1"},
            "priority": {
                "input": "3",
                "output": "4",
                "cached_input": "0.5",
                "cache_write_1h": "9",
            },
        },
        "web_search": "10",
    }
    header, row = out.splitlines()
    assert "TIERS" in header and "WEB SEARCH" in header
    assert "flex $0.75 / $1" in row and "$10/1k" in row
    # without them: the body is as before
    api, _ = cli(_listed(), "pricing", "set", "custom", "m", "--input", "1", "--output", "2",
                 "--checked", "2026-01-02")  # fmt: skip
    assert set(api.calls[0][2]) == {"provider", "model", "input", "output", "checked"}


@pytest.mark.parametrize(
    "spec",
    ["flex", "flex:", ":input=1", "flex:input", "flex:input=", "flex:colour=red",
     "flex:input=1,input=2", "flex:input=1,,output=2"],
)  # fmt: skip
def test_a_malformed_tier_flag_is_a_usage_error(spec):
    with pytest.raises(CliError) as caught:
        cli(_listed(), "pricing", "set", "custom", "m", "--input", "1", "--output", "2",
            "--tier", spec)  # fmt: skip
    assert caught.value.exit_code == EXIT_USAGE and "--tier" in str(caught.value)


def test_a_tier_given_twice_is_a_usage_error_not_the_last_one_kept():
    with pytest.raises(CliError) as caught:
        cli(_listed(), "pricing", "set", "openai", "o3", "--input", "2", "--output", "8",
            "--tier", "flex:input=1,output=4", "--tier", "flex:input=9,output=9")  # fmt: skip
    assert caught.value.exit_code == EXIT_USAGE and "'flex' is given twice" in str(caught.value)


def test_pricing_list_shows_tiers_and_search_rates(catalogue):
    by_name = {(e.provider, e.model): e for e in catalogue.entries}
    items = [
        {**entry_json(by_name[key]), "catalogue": None, "updated_at": None}
        for key in (("openai", "o3"), ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4"))
    ]
    _, out = cli({"items": items}, "pricing", "list")
    o3, sonnet, gpt4 = out.splitlines()[1:]
    assert "flex $1 / $4, priority $3.5 / $14" in o3
    assert "$10/1k" in sonnet and "$10/1k" not in o3 and "flex" not in gpt4


def test_a_request_explained_names_its_tier_and_searches():
    request = {
        "request_id": str(uuid.uuid4()),
        "created_at": "2026-01-02T03:04:05Z",
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "response_model": None,
        "method": "POST",
        "path": "/v1/messages",
        "status": 200,
        "prompt_tokens": 1000,
        "cached_tokens": 0,
        "cache_creation_tokens": 0,
        "cache_creation_1h_tokens": None,
        "completion_tokens": 100,
        "reasoning_tokens": None,
        "usage_source": "provider",
        "cost_usd": "0.0345",
        "service_tier": "priority",
        "web_search_requests": 3,
    }
    lines = [
        Line("input", 1000, D(3), D("0.003")).to_json(),
        Line("output", 100, D(15), D("0.0015")).to_json(),
        Line("web_search", 3, D(10), D("0.03")).to_json(),
    ]
    doc = {"request": request, "usage_raw": None, "pricing": {}, "lines": lines,
           "total_usd": "0.0345", "matches": True, "estimated": False, "note": "priced"}  # fmt: skip
    _, out = cli(doc, "usage", "--explain", request["request_id"])
    assert "service tier  priority" in out
    assert "completion 100, web searches 3" in out
    assert "  web_search          3 searches x $10/1k = $0.03" in out
    assert "  input           1,000 tokens x $3/M = $0.003" in out
    # a request without either says nothing of them
    plain = {**request, "service_tier": None, "web_search_requests": None}
    _, out = cli({**doc, "request": plain, "lines": lines[:2]}, "usage", "--explain",
                 request["request_id"])  # fmt: skip
    assert "service tier" not in out and "web searches" not in out


# --- the admin API: GET and PUT /admin/pricing, one request explained ---------------------------


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    from tests.support.admin import start_admin_env

    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


@pytest_twisted.ensureDeferred
async def test_tiers_and_search_rates_through_the_admin_api(env, db_url):
    from twisted.internet import reactor

    from lectr.storage.pricing import PricingStore
    from tests.support.pg import admin_execute

    query = {"provider": "openai", "model": "o3-2025-04-16"}
    [o3] = (await env.admin.get("/admin/pricing", params=query)).json["items"]
    assert o3["tiers"]["flex"] == {
        "input": "1",
        "output": "4",
        "cached_input": "0.25",
        "cache_write_5m": None,
        "cache_write_1h": None,
        "long_context": None,
    }
    assert o3["tiers"]["priority"]["input"] == "3.5" and o3["web_search"] is None
    query = {"provider": "anthropic", "model": "claude-sonnet-4-5"}
    [sonnet] = (await env.admin.get("/admin/pricing", params=query)).json["items"]
    assert (sonnet["web_search"], sonnet["tiers"]) == ("10", None)

    body = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input": "1.5",
        "output": 2,
        "checked": "2026-01-02",
        "tiers": {
            "flex": {"input": "0.75", "output": 1},
            "priority": {
                "input": 3,
                "output": "4",
                "cached_input": "0.5",
                "long_context": {"threshold": 1000, "input": 6, "output": 8},
            },
        },
        "web_search": "12.5",
    }
    put = await env.admin.put("/admin/pricing", body)
    assert put.status == 200, put.body
    doc = put.json
    assert doc["tiers"]["flex"] == {
        "input": "0.75",
        "output": "1",
        "cached_input": None,
        "cache_write_5m": None,
        "cache_write_1h": None,
        "long_context": None,
    }
    assert doc["tiers"]["priority"]["long_context"]["threshold"] == 1000
    assert doc["web_search"] == "12.5"
    assert doc["catalogue"]["tiers"]["priority"]["input"] == "0.25"  # the shipped entry's
    stored = admin_execute(db_url, "SELECT prices FROM price_overrides")
    assert stored == [
        (
            {
                "input": "1.5",
                "output": "2",
                "checked": "2026-01-02",
                "tiers": {
                    "flex": {"input": "0.75", "output": "1"},
                    "priority": {
                        "input": "3",
                        "output": "4",
                        "cached_input": "0.5",
                        "long_context": {"threshold": 1000, "input": "6", "output": "8"},
                    },
                },
                "web_search": "12.5",
            },
        )
    ]
    pricing = env.components.pricing
    # flex: 1000 x 0.75 + 100 x 1 = 850 µ$, and 2 searches x 12.5 / 1000 = 0.025
    flex = pricing.price("openai", "gpt-4o-mini", use(1000, 100, tier="flex", searches=2))
    assert flex.cost_usd == D("0.02585")
    # priority past its own threshold: 2000 x 6 + 100 x 8
    long = pricing.price("openai", "gpt-4o-mini", use(2000, 100, tier="priority"))
    assert long.cost_usd == D("0.0128") and long.tier == "long_context"
    # another node reads the stored document back to the same entry
    other = PricingManager(PricingStore(env.components.database), reactor=reactor,
                           metrics=Registry())  # fmt: skip
    await other.start()
    try:
        assert other.resolve("openai", "gpt-4o-mini") == pricing.resolve("openai", "gpt-4o-mini")
    finally:
        await other.stop()

    for change, word in [
        ({"tiers": {"Flex": {"input": 1, "output": 1}}}, "tiers.Flex"),
        ({"tiers": {"flex": {"input": 1}}}, "tiers.flex.output"),
        ({"tiers": {"flex": {"input": 1, "output": 1, "checked": "2026-01-02"}}}, "tiers.flex"),
        ({"tiers": {"flex": {"input": "0.0000001", "output": 1}}}, "decimals"),
        ({"tiers": "cheap"}, "tiers"),
        ({"web_search": "ten"}, "web_search"),
        ({"web_search": -1}, "web_search"),
    ]:
        answer = await env.admin.put("/admin/pricing", {**body, "model": "gpt-4o", **change})
        assert answer.status == 400, (change, answer.body)
        assert word in answer.json["error"]["message"], (change, answer.json)
    assert admin_execute(db_url, "SELECT count(*) FROM price_overrides") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_request_with_a_tier_and_searches_explained(env):
    """The stored basis names the tier and the search rate; the explanation's
    lines add up to the stored cost (the search line from the row's count)."""
    from lectr.storage.request_logs import RequestLogStore

    org = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    record = UsageRecord(
        request_id=str(uuid.uuid4()),
        created_at=datetime(2025, 3, 1, 12, tzinfo=UTC),
        org_id=org,
        key_id=None,
        provider="anthropic",
        model="claude-sonnet-4-5",
        method="POST",
        path="/v1/messages",
        status=200,
        latency_ms=12.5,
        ttfb_ms=3.0,
        streamed=False,
        usage=use(1000, 100, tier="priority", searches=3),
    )
    priced = env.components.pricing.price_record(record)
    # claude-sonnet-4-5 lists no tier: its base rates, and the searches at 10 / 1,000
    assert priced.cost_usd == D("0.0345")
    await RequestLogStore(env.components.database).insert([priced])
    doc = (await env.admin.get(f"/admin/requests/{record.request_id}")).json
    assert doc["request"]["service_tier"] == "priority"
    assert doc["request"]["web_search_requests"] == 3
    assert doc["pricing"]["rates"]["web_search"] == "10"
    assert doc["lines"][-1] == {
        "kind": "web_search",
        "searches": 3,
        "usd_per_thousand": "10",
        "cost_usd": "0.03",
    }
    assert doc["request"]["cost_usd"] == doc["total_usd"] == "0.0345" and doc["matches"] is True


RATE_TEXTS = st.one_of(
    st.builds(lambda d, p: str(Decimal(d).scaleb(-p)), st.integers(0, 10**9), st.integers(0, 40)),
    st.builds(lambda d, e: f"{d}E-{e}", st.integers(0, 10**6), st.integers(0, 20_000)),
    st.builds(lambda d, z: f"{d}." + "0" * z + "1", st.integers(0, 999), st.integers(0, 20_000)),
)


@settings(max_examples=200, deadline=None)
@given(text=RATE_TEXTS)
def test_a_rate_is_taken_exactly_or_refused(text):
    """A rate is kept exactly, or refused when it has more than six
    decimals, however far down its last digit sits (checked against exact
    fractions)."""
    from fractions import Fraction

    from lectr.pricing.catalogue import check_rate

    exact = Fraction(Decimal(text))  # (exact: Decimal reads any length of digits)
    if exact >= 1_000_000:
        return
    if (exact * 10**6).denominator == 1:
        assert Fraction(check_rate(text, "input")) == exact
    else:
        with pytest.raises(PriceError, match="at most 6 decimals"):
            check_rate(text, "input")


def test_a_rate_a_billion_places_down_is_refused_not_taken_as_zero():
    from lectr.pricing.catalogue import check_rate

    for text in ("1E-999999999", "0." + "0" * 1_000_000 + "1"):  # (normalize() made both 0)
        with pytest.raises(PriceError, match="at most 6 decimals"):
            check_rate(text, "input")
    assert check_rate("0E-1000000", "input") == 0
