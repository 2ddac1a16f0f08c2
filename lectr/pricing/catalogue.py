"""The price table: the catalogue shipped with the package
(``lectr/pricing/prices.toml``) merged with global admins' overrides, and how
a (provider, model) pair finds its entry.

Resolution, for a provider and a model name (case-insensitive):

1. the provider's own entries (overrides and catalogue; an override replaces
   the catalogue entry of the same name): the exact name, then the name
   without a snapshot suffix (``-2024-08-06``, ``-20250929``, ``-0613``,
   ``-001``, ``-latest``, ``-preview``, ``@20240620``, ``-v2:0``), one
   suffix at a time, then the same with dots written as dashes
   (``claude-sonnet-4.5``). The most specific name wins, whichever its
   source;
2. a provider priced as another (``azure`` → ``openai``), the same in that
   provider's entries;
3. a provider whose models are ``<vendor>/<model>`` (``openrouter``), the
   vendor's entries for ``<model>``.

A name that only shares a prefix is not priced by family (``gpt-4o-audio-preview``
is not ``gpt-4o``: its audio tokens cost more): it stays unpriced until listed.

An entry (a catalogue table, or an admin's JSON document: the same shape) is
its rates (USD per million tokens), and optionally ``long_context``
(``threshold`` and rates), ``tiers`` (service tier name -> rates, each with
its own optional ``long_context``), ``web_search`` (USD per 1,000 web
searches), ``max_output_tokens``, ``checked`` (required) and ``note``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources

from lectr.pricing.cost import (
    RATE_DECIMALS,
    RATE_KINDS,
    RATE_MAX,
    LongContext,
    PriceEntry,
    Rates,
    ServiceTier,
)
from lectr.usage.model import service_tier_of

CATALOGUE_FILE = "prices.toml"
PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MODEL_MAX = 256
MAX_OUTPUT_TOKENS_MAX = 100_000_000
THRESHOLD_MAX = 100_000_000
NOTE_MAX = 500
#: the most service tiers an entry may list
TIERS_MAX = 16

_SNAPSHOT_RE = re.compile(
    r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{3,4}|-latest|-preview(?:-\d{2}-\d{2})?"
    r"|-v\d+(?::\d+)?)$"
)
_MAX_STRIPS = 4
_RATE_QUANTUM = Decimal(1).scaleb(-RATE_DECIMALS)


class PriceError(ValueError):
    """A price entry that cannot be accepted (the message says why)."""


# --- validation ---------------------------------------------------------------------------


def check_provider(value: object) -> str:
    if not isinstance(value, str) or not PROVIDER_RE.fullmatch(value):
        raise PriceError(
            "provider must be a provider name: lower-case letters, digits, '-' or '_' (at most 64)"
        )
    return value


def check_model(value: object) -> str:
    if not isinstance(value, str):
        raise PriceError("model must be a string")
    name = value.strip()
    if not 1 <= len(name) <= MODEL_MAX:
        raise PriceError(f"model must be 1 to {MODEL_MAX} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in name):
        raise PriceError("model must not contain spaces or control characters")
    return name.lower()


def check_rate(value: object, what: str, unit: str = "USD per million tokens") -> Decimal:
    """A rate: a non-negative number with at most six decimals (a JSON
    number or a decimal string; floats are read through their shortest
    text, so 0.1 is 0.1)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise PriceError(f"{what} must be a number ({unit})")
    try:
        rate = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise PriceError(f"{what} must be a number ({unit})") from None
    if not rate.is_finite() or rate < 0 or rate >= RATE_MAX:
        raise PriceError(f"{what} must be from 0 to less than {RATE_MAX}")
    # one exponent for every rate (0E-1000000 is 0.000000); a rate it would
    # round is refused (compared exactly: normalize() rounded a 1 a million
    # places down to 0, and took it)
    quantized = rate.quantize(_RATE_QUANTUM)
    if quantized != rate:
        raise PriceError(f"{what} may have at most {RATE_DECIMALS} decimals")
    return quantized


def _check_count(value: object, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise PriceError(f"{what} must be a whole number from 1 to {maximum}")
    return value


def _check_date(value: object) -> date:
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise PriceError("checked must be a date, YYYY-MM-DD")


def _rates(doc: dict, what: str, required: bool) -> Rates:
    values = {}
    for kind in RATE_KINDS:
        if doc.get(kind) is None:
            if required and kind in ("input", "output"):
                raise PriceError(f"{what}{kind} is required")
            values[kind] = None
        else:
            values[kind] = check_rate(doc[kind], f"{what}{kind}")
    return Rates(**values)


ENTRY_FIELDS = frozenset(
    (*RATE_KINDS, "long_context", "tiers", "web_search", "max_output_tokens", "checked", "note")
)
TIER_FIELDS = frozenset((*RATE_KINDS, "long_context"))


def _long_context(lc: object, what: str) -> LongContext | None:
    if lc is None:
        return None
    if not isinstance(lc, dict):
        raise PriceError(f"{what} must be an object")
    extra = set(lc) - {*RATE_KINDS, "threshold"}
    if extra:
        raise PriceError(f"unknown {what} field(s): {', '.join(sorted(extra))}")
    threshold = _check_count(lc.get("threshold"), f"{what}.threshold", THRESHOLD_MAX)
    return LongContext(threshold, _rates(lc, f"{what}.", required=True))


def _shown(name: object) -> str:
    text = name if isinstance(name, str) else repr(name)
    return text if len(text) <= 40 else text[:40] + "…"


def _tiers(doc: object) -> tuple[ServiceTier, ...]:
    """``tiers``: service tier name -> its rates (input and output required,
    a cache rate not given: the tier's input rate) and its own optional
    ``long_context``."""
    if doc is None:
        return ()
    if not isinstance(doc, dict):
        raise PriceError("tiers must be an object: service tier name -> rates")
    if len(doc) > TIERS_MAX:
        raise PriceError(f"tiers may list at most {TIERS_MAX} service tiers")
    tiers = []
    for name, rates in doc.items():
        if service_tier_of(name) is None:
            raise PriceError(
                f"tiers.{_shown(name)}: a service tier is named by 1 to 32 lower-case "
                "letters, digits, '_' or '-' (as the provider reports it)"
            )
        what = f"tiers.{name}"
        if not isinstance(rates, dict):
            raise PriceError(f"{what} must be an object (its rates)")
        unknown = set(rates) - TIER_FIELDS
        if unknown:
            listed = ", ".join(sorted(_shown(k) for k in unknown))
            raise PriceError(f"unknown {what} field(s): {listed}")
        tiers.append(
            ServiceTier(
                name,
                _rates(rates, f"{what}.", required=True),
                _long_context(rates.get("long_context"), f"{what}.long_context"),
            )
        )
    return tuple(tiers)


def parse_entry(provider: object, model: object, doc: object, *, source: str) -> PriceEntry:
    """One price entry from a catalogue table or an admin's JSON body.
    Raises PriceError with a message fit for the caller."""
    provider = check_provider(provider)
    name = check_model(model)
    if not isinstance(doc, dict):
        raise PriceError("prices must be an object")
    unknown = set(doc) - ENTRY_FIELDS
    if unknown:
        raise PriceError(f"unknown price field(s): {', '.join(sorted(unknown))}")
    rates = _rates(doc, "", required=True)
    long = _long_context(doc.get("long_context"), "long_context")
    tiers = _tiers(doc.get("tiers"))
    web_search = doc.get("web_search")
    if web_search is not None:
        web_search = check_rate(web_search, "web_search", "USD per 1,000 web searches")
    max_out = doc.get("max_output_tokens")
    if max_out is not None:
        max_out = _check_count(max_out, "max_output_tokens", MAX_OUTPUT_TOKENS_MAX)
    note = doc.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > NOTE_MAX):
        raise PriceError(f"note must be a string of at most {NOTE_MAX} characters")
    if "checked" not in doc:
        raise PriceError("checked (the date the price was checked) is required")
    return PriceEntry(
        provider=provider,
        model=name,
        rates=rates,
        checked=_check_date(doc["checked"]),
        source=source,
        long_context=long,
        max_output_tokens=max_out,
        note=note,
        tiers=tiers,
        web_search=web_search,
    )


# --- the catalogue --------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    entries: tuple[PriceEntry, ...]
    prices_as: dict[str, str] = field(default_factory=dict)  # provider -> provider
    vendor_prefixes: dict[str, dict[str, str]] = field(default_factory=dict)


def parse_catalogue(text: str) -> Catalogue:
    """The catalogue from TOML text; PriceError names the bad entry."""
    doc = tomllib.loads(text, parse_float=Decimal)
    entries = []
    for provider, models in doc.get("models", {}).items():
        for model, prices in models.items():
            try:
                entries.append(parse_entry(provider, model, prices, source="catalogue"))
            except PriceError as e:
                raise PriceError(f"prices.toml [models.{provider}.{model!r}]: {e}") from None
    prices_as: dict[str, str] = {}
    prefixes: dict[str, dict[str, str]] = {}
    for provider, conf in doc.get("providers", {}).items():
        check_provider(provider)
        if "prices_as" in conf:
            prices_as[provider] = check_provider(conf["prices_as"])
        if "vendor_prefixes" in conf:
            prefixes[provider] = {
                str(p).lower(): check_provider(v) for p, v in conf["vendor_prefixes"].items()
            }
    return Catalogue(tuple(entries), prices_as, prefixes)


def load_catalogue() -> Catalogue:
    """The price table shipped with the package."""
    text = resources.files("lectr.pricing").joinpath(CATALOGUE_FILE).read_text("utf-8")
    return parse_catalogue(text)


# --- resolution -----------------------------------------------------------------------------


def candidates(model: str) -> Iterator[str]:
    """The names ``model`` may be listed under, most specific first."""
    name = model.strip().lower()
    seen = set()
    for variant in (name, name.replace(".", "-")):
        current = variant
        for _ in range(_MAX_STRIPS + 1):
            if current and current not in seen:
                seen.add(current)
                yield current
            stripped = _SNAPSHOT_RE.sub("", current)
            if stripped == current:
                break
            current = stripped


class PriceTable:
    """The merged table (immutable: a change builds a new one)."""

    def __init__(self, catalogue: Catalogue, overrides: Iterable[PriceEntry] = ()) -> None:
        self.catalogue = catalogue
        by_provider: dict[str, dict[str, PriceEntry]] = {}
        for entry in catalogue.entries:
            by_provider.setdefault(entry.provider, {})[entry.model] = entry
        self.overrides = tuple(overrides)
        for entry in self.overrides:
            by_provider.setdefault(entry.provider, {})[entry.model] = entry
        self._by_provider = by_provider

    def entries(self) -> list[PriceEntry]:
        """Every entry in effect (overrides replacing catalogue entries),
        by provider and model."""
        return [
            self._by_provider[p][m]
            for p in sorted(self._by_provider)
            for m in sorted(self._by_provider[p])
        ]

    def catalogue_entry(self, provider: str, model: str) -> PriceEntry | None:
        for entry in self.catalogue.entries:
            if entry.provider == provider and entry.model == model:
                return entry
        return None

    def lookup(self, provider: str, model: str) -> PriceEntry | None:
        """The entry that prices ``model`` on ``provider`` (see the module
        docstring), or None."""
        entry = self._find(provider, model)
        if entry is not None:
            return entry
        other = self.catalogue.prices_as.get(provider)
        if other is not None:
            entry = self._find(other, model)
            if entry is not None:
                return entry
        prefixes = self.catalogue.vendor_prefixes.get(provider)
        if prefixes:
            folded = model.strip().lower()
            for prefix, vendor in prefixes.items():
                if folded.startswith(prefix) and len(folded) > len(prefix):
                    return self._find(vendor, folded[len(prefix) :])
        return None

    def _find(self, provider: str, model: str) -> PriceEntry | None:
        table = self._by_provider.get(provider)
        if not table:
            return None
        for name in candidates(model):
            entry = table.get(name)
            if entry is not None:
                return entry
        return None
