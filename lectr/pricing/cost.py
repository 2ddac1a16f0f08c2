"""The cost of one request: exact decimal arithmetic from a usage and a
price entry.

Rates are USD per million tokens with at most six decimals, held as whole
micro-dollars per million tokens, so a request's cost is an integer number of
pico-dollars (10⁻¹² USD) computed with integer arithmetic and turned into one
exact :class:`~decimal.Decimal` at the end: no float anywhere, and a few
microseconds per request (``bench/pricing_bench.py``).

What each token costs (``Usage`` is normalized by the meters, see
:mod:`lectr.usage.model`):

- ``prompt_tokens`` is every prompt token. Of those, ``cached_tokens`` are
  billed at ``cached_input``, ``cache_creation_tokens`` at ``cache_write_5m``
  (its ``cache_creation_1h_tokens`` part at ``cache_write_1h``), and the rest
  at ``input``. Nothing is counted twice: OpenAI's ``prompt_tokens`` already
  includes its ``cached_tokens``; Anthropic's cache reads and writes were added
  to its ``input_tokens`` by the meter, and are taken out again here.
- ``completion_tokens`` (reasoning included) at ``output``.
- A prompt past the entry's long-context threshold prices the whole request
  at the long-context rates.
- A request the provider says it served at a service tier the entry lists
  (``Usage.service_tier``: OpenAI's ``flex``, ``priority``...) is priced
  whole at that tier's rates, and by that tier's own long context if it has
  one (the entry's base long context never applies to it); any other tier,
  or none, at the base rates.
- Server-side web searches (``Usage.web_search_requests``) at the entry's
  ``web_search`` rate, USD per 1,000 searches, whatever the tier (without a
  rate they are not priced).
- An estimated usage (a cut response) with no prompt count gets one from the
  request's size: one token per four bytes, rounded up.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal, localcontext
from typing import NamedTuple

from lectr.usage.model import Usage, UsageRecord

#: rates are held as whole micro-dollars per million tokens
RATE_SCALE = 10**6
#: rates may carry at most this many decimals
RATE_DECIMALS = 6
#: the largest rate accepted (USD per million tokens)
RATE_MAX = Decimal(1_000_000)
#: bytes of request body per estimated prompt token
BYTES_PER_TOKEN = 4

RATE_KINDS = ("input", "output", "cached_input", "cache_write_5m", "cache_write_1h")
#: a basis's (and a breakdown's) rate of web searches: USD per 1,000 searches
WEB_SEARCH = "web_search"
#: pico-dollars (the unit of a cost) per search for a rate of one micro-dollar
#: per 1,000 searches: 10^-6 / 10^3 USD = 10^-9 USD = 1,000 pico-dollars
_PICO_PER_SEARCH_UNIT = 1_000


def format_usd(value: Decimal | None) -> str | None:
    """A decimal as plain fixed-point text, without trailing zeros
    (``0.0000425``, ``12``); None stays None."""
    if value is None:
        return None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens; None: the input rate applies."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None

    def to_json(self) -> dict:
        return {k: format_usd(getattr(self, k)) for k in RATE_KINDS}


class Basis(NamedTuple):
    """What a stored cost was computed from, as stored (``price_bases``):
    the entry, the tier and the effective rates. ``id`` is derived from
    ``json``, so every node names the same basis with the same id."""

    id: int
    json: str

    @classmethod
    def of(cls, doc: dict) -> Basis:
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        return cls(basis_id(text), text)


def basis_id(text: str) -> int:
    """A signed 64-bit id for a basis document (the first 8 bytes of its
    SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Tier:
    """The effective rates of one tier of an entry (fallbacks applied), as
    decimals and as integers, and the basis they make."""

    name: str  # "base" | "long_context" (of the entry, or of one of its service tiers)
    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    i_input: int
    i_output: int
    i_cached: int
    i_write_5m: int
    i_write_1h: int
    basis: Basis
    #: the basis of a request that also ran web searches (the rate named in
    #: its ``rates``); None: the entry has no web-search rate
    basis_ws: Basis | None = None
    i_search: int = 0  # pico-dollars per web search
    i_dearest: int = 0  # the dearest prompt rate (what a worst case charges each prompt token)

    def __post_init__(self) -> None:
        dearest = max(self.i_input, self.i_cached, self.i_write_5m, self.i_write_1h)
        object.__setattr__(self, "i_dearest", dearest)

    def rates(self) -> dict[str, Decimal]:
        return {k: getattr(self, k) for k in RATE_KINDS}


def _micro(rate: Decimal) -> int:
    scaled = rate.scaleb(RATE_DECIMALS)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"a rate may have at most {RATE_DECIMALS} decimals, got {rate}")
    return int(scaled)


@dataclass(frozen=True, slots=True)
class LongContext:
    threshold: int  # prompt tokens; a prompt above this is priced at ``rates``
    rates: Rates


@dataclass(frozen=True, slots=True)
class ServiceTier:
    """The rates of one service tier of an entry (OpenAI's ``flex`` or
    ``priority``...): a request the provider says it served at ``name``
    is priced whole at these, past ``long_context``'s threshold (if any) at
    its rates. A cache rate not given: this tier's input rate."""

    name: str  # as the provider reports it (lectr.usage.model.service_tier_of)
    rates: Rates
    long_context: LongContext | None = None


class TierTable(NamedTuple):
    """A service tier's effective rates, as :func:`cost_of` picks them."""

    base: Tier
    long: Tier | None
    threshold: int  # a prompt above it is priced at ``long`` (no long: never crossed)


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One model's prices (from the catalogue, or a global admin's override)."""

    provider: str
    model: str  # the name as listed (lower case)
    rates: Rates
    checked: date
    source: str = "catalogue"  # catalogue | override
    long_context: LongContext | None = None
    max_output_tokens: int | None = None
    note: str | None = None
    #: rates by service tier (none: every request at the base rates)
    tiers: tuple[ServiceTier, ...] = ()
    #: USD per 1,000 server-side web searches (None: searches are not priced)
    web_search: Decimal | None = None
    base: Tier = field(init=False, compare=False, repr=False)
    long: Tier | None = field(init=False, compare=False, repr=False)
    #: the service tiers' effective rates by name (None: the entry lists none)
    by_tier: dict[str, TierTable] | None = field(init=False, compare=False, repr=False)
    # what a budget reservation reads, flat (see worst_units): the lowest
    # long-context threshold (none: never crossed); the dearest prompt rate and
    # output rate a request can be charged at or below it, and above it (over
    # the base rates and every service tier's); the model's output limit
    worst: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        base = self._tier("base", self.rates, None, None, None)
        object.__setattr__(self, "base", base)
        long = None
        threshold = sys.maxsize
        if self.long_context is not None:
            threshold = self.long_context.threshold
            long = self._tier("long_context", self.long_context.rates, base, threshold, None)
        object.__setattr__(self, "long", long)
        tables = [TierTable(base, long, threshold)]
        by_tier = None
        if self.tiers:
            by_tier = {}
            for t in self.tiers:
                t_base = self._tier("base", t.rates, None, None, t.name)
                t_long, t_threshold = None, sys.maxsize
                if t.long_context is not None:
                    t_threshold = t.long_context.threshold
                    t_long = self._tier(
                        "long_context", t.long_context.rates, t_base, t_threshold, t.name
                    )
                by_tier[t.name] = TierTable(t_base, t_long, t_threshold)
            tables.extend(by_tier.values())
        object.__setattr__(self, "by_tier", by_tier)
        # at or below the lowest threshold, no table's long context applies; above
        # it, any table's rates may (a table whose threshold is higher still
        # charges its base rates there): an over-reservation, never an under-one
        low = min(t.threshold for t in tables)
        everything = [x for t in tables for x in (t.base, t.long) if x is not None]
        worst = (
            low,
            max(t.base.i_dearest for t in tables),
            max(t.base.i_output for t in tables),
            max(x.i_dearest for x in everything),
            max(x.i_output for x in everything),
            self.max_output_tokens,
        )
        if not self.tiers and long is not None:  # (as before tiers: the long-context rates)
            worst = (low, base.i_dearest, base.i_output, long.i_dearest, long.i_output, worst[5])
        object.__setattr__(self, "worst", worst)

    def _tier(
        self,
        name: str,
        rates: Rates,
        fallback: Tier | None,
        threshold: int | None,
        service_tier: str | None,
    ) -> Tier:
        def pick(kind: str) -> Decimal:
            value = getattr(rates, kind)
            if value is not None:
                return value
            if fallback is not None:  # a long-context rate not given: the base one
                return getattr(fallback, kind)
            return rates.input  # no cache rate: the input rate

        values = {kind: pick(kind) for kind in RATE_KINDS}
        doc: dict = {
            "provider": self.provider,
            "model": self.model,
            "source": self.source,
            "checked": self.checked.isoformat(),
            "tier": name,
            "threshold": threshold,
            "rates": {k: format_usd(v) for k, v in values.items()},
        }
        if service_tier is not None:  # (absent at the base rates: their ids never change)
            doc["service_tier"] = service_tier
        basis_ws = None
        i_search = 0
        if self.web_search is not None:
            with_searches = {
                **doc,
                "rates": {**doc["rates"], WEB_SEARCH: format_usd(self.web_search)},
            }
            basis_ws = Basis.of(with_searches)
            i_search = _micro(self.web_search) * _PICO_PER_SEARCH_UNIT
        return Tier(
            name,
            values["input"],
            values["output"],
            values["cached_input"],
            values["cache_write_5m"],
            values["cache_write_1h"],
            _micro(values["input"]),
            _micro(values["output"]),
            _micro(values["cached_input"]),
            _micro(values["cache_write_5m"]),
            _micro(values["cache_write_1h"]),
            Basis.of(doc),
            basis_ws,
            i_search,
        )

    def tier_for(self, prompt_tokens: int, service_tier: str | None = None) -> Tier:
        """The rates a request of ``prompt_tokens`` served at
        ``service_tier`` is priced at (as :func:`cost_of` picks them)."""
        table = self.by_tier.get(service_tier) if self.by_tier is not None else None
        if table is not None:
            if table.long is not None and prompt_tokens > table.threshold:
                return table.long
            return table.base
        lc = self.long_context
        if lc is not None and prompt_tokens > lc.threshold:
            return self.long  # type: ignore[return-value]
        return self.base


class Priced(NamedTuple):
    """The price of one request. ``cost_usd`` None means unpriced (see
    ``reason``), never zero."""

    cost_usd: Decimal | None
    estimated: bool  # the cost rests on estimated counts (a cut response)
    basis: Basis | None  # what it was computed from (None: unpriced)
    entry: PriceEntry | None = None  # the price entry (None when read back from storage)
    prompt_estimate: int | None = None  # prompt tokens estimated from the request's size
    reason: str | None = None  # why unpriced: no_usage | no_model | unknown_model
    #: ``cost_usd`` in whole micro-dollars, rounded up (what budgets are
    #: charged; None: unpriced, or read back from storage)
    cost_micro: int | None = None

    @property
    def tier(self) -> str | None:
        """``base`` or ``long_context`` (None: unpriced)."""
        return self.provenance["tier"] if self.basis is not None else None

    @property
    def service_tier(self) -> str | None:
        """The service tier whose rates priced the request (None: the base
        rates, or unpriced)."""
        return self.provenance.get("service_tier") if self.basis is not None else None

    @property
    def provenance(self) -> dict | None:
        """The prices used, as stored: provider, model (the entry), source,
        checked (the date), tier, threshold, rates (decimal strings; with
        ``web_search``, USD per 1,000 searches, when searches were priced),
        and ``service_tier`` when a service tier's rates were used."""
        return json.loads(self.basis.json) if self.basis is not None else None


#: the price of a request without usage (an error, an unmetered route)
UNMETERED = Priced(None, False, None, reason="no_usage")


def estimate_prompt_tokens(request_bytes: int) -> int:
    """Prompt tokens guessed from the request body's size (about four bytes
    a token; JSON structure and base64 images make it an overestimate)."""
    return -(-request_bytes // BYTES_PER_TOKEN) if request_bytes > 0 else 0


def cost_of(entry: PriceEntry, usage: Usage, request_bytes: int = 0) -> Priced:
    """The request's cost at ``entry``'s prices. The hot path: integers only,
    one Decimal at the end."""
    estimated = usage.source == "estimated"
    prompt = usage.prompt_tokens
    prompt_estimate = None
    if prompt is None:
        if estimated and request_bytes > 0:
            prompt = prompt_estimate = estimate_prompt_tokens(request_bytes)
        else:  # (a request body of unknown size: the prompt is not priced)
            prompt = 0
    cached = usage.cached_tokens or 0
    writes = usage.cache_creation_tokens or 0
    writes_1h = usage.cache_creation_1h_tokens or 0
    if writes_1h > writes:
        writes_1h = writes
    fresh = prompt - cached - writes
    if fresh < 0:  # a report whose parts exceed its whole: never a negative count
        fresh = 0
    completion = usage.completion_tokens or 0
    if estimated and not (prompt or completion or cached or writes):
        return Priced(None, True, None, entry, prompt_estimate, "no_usage")
    by_tier = entry.by_tier
    if (
        by_tier is None
        or (served := usage.service_tier) is None
        or (table := by_tier.get(served)) is None
    ):
        lc = entry.long_context
        t = entry.long if lc is not None and prompt > lc.threshold else entry.base
    else:
        t = table.long if table.long is not None and prompt > table.threshold else table.base
    pico = (
        fresh * t.i_input
        + cached * t.i_cached
        + (writes - writes_1h) * t.i_write_5m
        + writes_1h * t.i_write_1h
        + completion * t.i_output
    )
    basis = t.basis
    searches = usage.web_search_requests
    if searches and searches > 0 and t.basis_ws is not None:
        pico += searches * t.i_search
        basis = t.basis_ws
    return Priced(
        Decimal(pico).scaleb(-12),
        estimated,
        basis,
        entry,
        prompt_estimate,
        None,
        -(-pico // 1_000_000),
    )


def worst_case_units(
    entry: PriceEntry, prompt_tokens: int, max_output_tokens: int | None
) -> int | None:
    """:func:`worst_case` in integer units of 10^-12 USD (the rates' own
    scale): the hot path of budget reservations, no Decimal."""
    return worst_units(entry.worst, prompt_tokens if prompt_tokens > 0 else 0, max_output_tokens)


def worst_units(
    worst: tuple, prompt: int, max_output_tokens: int | None, completions: int = 1
) -> int | None:
    """:func:`worst_case_units` from an entry's flat ``worst`` tuple and a
    prompt count >= 0 (what the proxy calls per target of a plan);
    ``completions`` (at least 1): how many completions are generated and
    billed (OpenAI's ``n``), each up to the output limit."""
    threshold, dearest, output, long_dearest, long_output, limit = worst
    if prompt > threshold:
        dearest, output = long_dearest, long_output
    if max_output_tokens is not None:
        limit = max_output_tokens
    elif limit is None:
        return None if output else prompt * dearest
    return prompt * dearest + (limit if limit > 0 else 0) * output * completions


def worst_case(
    entry: PriceEntry, prompt_tokens: int, max_output_tokens: int | None
) -> Decimal | None:
    """The most a request can cost: every prompt token at the dearest prompt
    rate (a cache write can cost more than plain input), and the output
    limit (the request's, else the model's) at the output rate, at the
    dearest rates the prompt can be charged at: the base rates' and every
    service tier's (a request does not say which tier will serve it), past
    the lowest long-context threshold their long-context rates too. None when
    the output is unbounded (no limit known and the output is not free).
    Web searches are not in it (nothing bounds their count)."""
    units = worst_case_units(entry, prompt_tokens, max_output_tokens)
    return None if units is None else Decimal(units).scaleb(-12)


# --- explaining a stored cost ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    kind: str  # input | cached_input | cache_write_5m | cache_write_1h | output | web_search
    tokens: int  # (web_search: the searches)
    rate: Decimal  # USD per million tokens (web_search: per 1,000 searches)
    cost: Decimal  # tokens × rate / 1,000,000 (web_search: searches × rate / 1,000)

    def to_json(self) -> dict:
        if self.kind == WEB_SEARCH:
            return {
                "kind": self.kind,
                "searches": self.tokens,
                "usd_per_thousand": format_usd(self.rate),
                "cost_usd": format_usd(self.cost),
            }
        return {
            "kind": self.kind,
            "tokens": self.tokens,
            "usd_per_million": format_usd(self.rate),
            "cost_usd": format_usd(self.cost),
        }


def breakdown(
    rates: dict[str, Decimal],
    *,
    prompt_tokens: int,
    cached_tokens: int,
    cache_creation_tokens: int,
    cache_creation_1h_tokens: int,
    completion_tokens: int,
    web_search_requests: int = 0,
) -> tuple[list[Line], Decimal]:
    """The arithmetic of a cost, line by line, the same way
    :func:`cost_of` does it (in decimals, for people). ``rates``: a basis's
    rates; web searches make a line only when it names their rate
    (``web_search``: :func:`cost_of` priced them), else they were not
    priced and make none."""
    writes_1h = min(cache_creation_1h_tokens, cache_creation_tokens)
    fresh = max(prompt_tokens - cached_tokens - cache_creation_tokens, 0)
    counts = (
        ("input", fresh),
        ("cached_input", cached_tokens),
        ("cache_write_5m", cache_creation_tokens - writes_1h),
        ("cache_write_1h", writes_1h),
        ("output", completion_tokens),
    )
    lines = []
    total = Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 60
        for kind, tokens in counts:
            if not tokens:
                continue
            cost = Decimal(tokens) * rates[kind] / 1_000_000
            lines.append(Line(kind, tokens, rates[kind], cost))
            total += cost
        search_rate = rates.get(WEB_SEARCH)
        if web_search_requests > 0 and search_rate is not None:
            cost = Decimal(web_search_requests) * search_rate / 1_000
            lines.append(Line(WEB_SEARCH, web_search_requests, search_rate, cost))
            total += cost
    return lines, total


def with_estimates(record: UsageRecord) -> UsageRecord:
    """The record with the prompt count its price was estimated with, when
    the usage had none (so that the row's tokens and cost agree, both
    marked ``estimated``); ``record`` itself otherwise."""
    priced = record.pricing
    if priced is None or priced.prompt_estimate is None:
        return record
    u = record.usage
    if u.prompt_tokens is not None:
        return record
    prompt = priced.prompt_estimate
    total = prompt + u.completion_tokens if u.completion_tokens is not None else None
    return replace(record, usage=replace(u, prompt_tokens=prompt, total_tokens=total))
