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

    name: str  # "base" | "long_context"
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
    base: Tier = field(init=False, compare=False, repr=False)
    long: Tier | None = field(init=False, compare=False, repr=False)
    # what a budget reservation reads, flat (see worst_units): the long-context
    # threshold (no long context: never crossed), the dearest prompt rate and
    # the output rate of each tier, the model's output limit
    worst: tuple = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        base = self._tier("base", self.rates, None)
        object.__setattr__(self, "base", base)
        long = None
        threshold = sys.maxsize
        if self.long_context is not None:
            long = self._tier("long_context", self.long_context.rates, base)
            threshold = self.long_context.threshold
        object.__setattr__(self, "long", long)
        top = long if long is not None else base
        worst = (
            threshold,
            base.i_dearest,
            base.i_output,
            top.i_dearest,
            top.i_output,
            self.max_output_tokens,
        )
        object.__setattr__(self, "worst", worst)

    def _tier(self, name: str, rates: Rates, fallback: Tier | None) -> Tier:
        def pick(kind: str) -> Decimal:
            value = getattr(rates, kind)
            if value is not None:
                return value
            if fallback is not None:  # a long-context rate not given: the base one
                return getattr(fallback, kind)
            return rates.input  # no cache rate: the input rate

        values = {kind: pick(kind) for kind in RATE_KINDS}
        doc = {
            "provider": self.provider,
            "model": self.model,
            "source": self.source,
            "checked": self.checked.isoformat(),
            "tier": name,
            "threshold": self.long_context.threshold if fallback is not None else None,
            "rates": {k: format_usd(v) for k, v in values.items()},
        }
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
        )

    def tier_for(self, prompt_tokens: int) -> Tier:
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
    def provenance(self) -> dict | None:
        """The prices used, as stored: provider, model (the entry), source,
        checked (the date), tier, threshold, rates (decimal strings)."""
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
    lc = entry.long_context
    t = entry.long if lc is not None and prompt > lc.threshold else entry.base
    pico = (
        fresh * t.i_input
        + cached * t.i_cached
        + (writes - writes_1h) * t.i_write_5m
        + writes_1h * t.i_write_1h
        + completion * t.i_output
    )
    return Priced(
        Decimal(pico).scaleb(-12),
        estimated,
        t.basis,
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
    limit (the request's, else the model's) at the output rate, at the tier
    the prompt falls in. None when the output is unbounded (no limit known
    and the output is not free)."""
    units = worst_case_units(entry, prompt_tokens, max_output_tokens)
    return None if units is None else Decimal(units).scaleb(-12)


# --- explaining a stored cost ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    kind: str  # input | cached_input | cache_write_5m | cache_write_1h | output
    tokens: int
    rate: Decimal  # USD per million tokens
    cost: Decimal  # tokens × rate / 1,000,000

    def to_json(self) -> dict:
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
) -> tuple[list[Line], Decimal]:
    """The arithmetic of a cost, line by line, the same way
    :func:`cost_of` does it (in decimals, for people)."""
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
