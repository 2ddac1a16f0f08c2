"""Prices for the rest of Lectr: what a request cost, and the most a
request can cost.

:class:`PricingManager` holds the price table in memory: the catalogue
shipped with the package merged with the global admins' overrides
(``price_overrides``, reloaded on every node when a ``pricing:<provider>``
notification arrives, and after a listener reset). Its pricing methods are
pure and never touch the database; a (provider, model) pair is resolved once
and cached.

- :meth:`PricingManager.price` — the cost of one request from its usage
  (called by the proxy at the end of every request, and by the usage
  recorder for rows that arrive without a price);
- :meth:`PricingManager.worst_case_usd` — the most a request can cost, for
  budget reservations (:meth:`~PricingManager.worst_case_micro`: the same in
  whole micro-dollars, on integers, for the proxy);
- :meth:`PricingManager.price_record` — a usage record with its price.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.errors import BadRequest, NotFound
from lectr.metrics import Registry
from lectr.pricing.catalogue import (
    Catalogue,
    PriceError,
    PriceTable,
    check_model,
    check_provider,
    load_catalogue,
    parse_entry,
)
from lectr.pricing.cost import (
    UNMETERED,
    Priced,
    PriceEntry,
    cost_of,
    format_usd,
    worst_case,
    worst_case_units,
    worst_units,
)
from lectr.usage.model import Usage, UsageRecord
from lectr.util.deferred import timeout_without_cancel
from lectr.vault.reloader import OrgCacheReloader

#: resolved (provider, model) pairs kept; past this the cache starts over
#: (model names come from clients: a flood of made-up names must not grow it)
RESOLVE_CACHE_MAX = 10_000
_MISSING = object()


def _long_json(lc) -> dict | None:
    return {"threshold": lc.threshold, **lc.rates.to_json()} if lc is not None else None


def entry_json(entry: PriceEntry) -> dict:
    """An entry as the admin API shows it (rates as given: null means the
    input rate applies). ``tiers``: service tier name -> its rates and
    long_context (null: the entry lists none); ``web_search``: USD per
    1,000 web searches (null: not priced)."""
    return {
        "provider": entry.provider,
        "model": entry.model,
        "source": entry.source,
        **entry.rates.to_json(),
        "long_context": _long_json(entry.long_context),
        "tiers": (
            {
                t.name: {**t.rates.to_json(), "long_context": _long_json(t.long_context)}
                for t in entry.tiers
            }
            if entry.tiers
            else None
        ),
        "web_search": format_usd(entry.web_search),
        "max_output_tokens": entry.max_output_tokens,
        "checked": entry.checked.isoformat(),
        "note": entry.note,
    }


def _without_nulls(doc: dict | None) -> dict | None:
    return {k: v for k, v in doc.items() if v is not None} if doc is not None else None


def _stored(entry: PriceEntry) -> dict:
    """An override as stored (exact decimals as strings; what parse_entry
    reads back)."""
    doc = {k: v for k, v in entry_json(entry).items() if k not in ("provider", "model", "source")}
    doc["long_context"] = _without_nulls(doc["long_context"])
    if doc["tiers"] is not None:
        doc["tiers"] = {
            name: _without_nulls({**rates, "long_context": _without_nulls(rates["long_context"])})
            for name, rates in doc["tiers"].items()
        }
    return {k: v for k, v in doc.items() if v is not None}


@dataclass(frozen=True, slots=True)
class PriceView:
    entry: PriceEntry
    catalogue: PriceEntry | None  # the shipped entry an override replaces
    updated_at: datetime | None  # of an override

    def to_json(self) -> dict:
        return {
            **entry_json(self.entry),
            "catalogue": entry_json(self.catalogue) if self.catalogue is not None else None,
            "updated_at": self.updated_at,
        }


class PricingManager:
    _log = Logger()

    def __init__(
        self,
        store=None,
        *,
        reactor,
        metrics: Registry,
        listener=None,
        catalogue: Catalogue | None = None,
    ) -> None:
        self._store = store
        self._listener = listener
        self._reactor = reactor
        self._catalogue = catalogue if catalogue is not None else load_catalogue()
        self._table = PriceTable(self._catalogue)
        self._updated: dict[tuple[str, str], datetime] = {}
        self._cache: dict[tuple[str, str], object] = {}
        self._reloader = OrgCacheReloader(
            "price overrides",
            load_orgs=lambda _providers: self._load(),
            load_all=self._load,
            reactor=reactor,
        )
        self._m_unpriced = metrics.counter(
            "lectr_unpriced_requests_total",
            "Metered requests whose model has no price (recorded with a NULL cost)",
            ["provider"],
        )
        metrics.callback_gauge(
            "lectr_price_overrides",
            "Price overrides and custom models in effect",
            lambda: len(self._table.overrides),
            mode="livemax",  # every worker holds the same table
        )

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the overrides and follow changes to them."""
        if self._listener is not None:
            self._listener.subscribe("pricing", self._reloader.org_changed)
            self._listener.on_reset(self._reloader.reset)
        if self._store is not None:
            await self._load()
        self._reloader.start()
        self._log.info(
            "prices: {n} catalogue entries, {o} overrides",
            n=len(self._catalogue.entries),
            o=len(self._table.overrides),
        )

    async def stop(self) -> None:
        self._reloader.stop()

    async def _load(self) -> None:
        if self._store is None:
            return
        rows = await self._store.load()
        overrides = []
        updated = {}
        for row in rows:
            try:
                overrides.append(
                    parse_entry(row.provider, row.model, row.prices, source="override")
                )
            except PriceError as e:
                self._log.warn(
                    "ignoring the stored price of {provider}/{model}: {error}",
                    provider=row.provider,
                    model=row.model,
                    error=str(e),
                )
                continue
            updated[(row.provider, row.model)] = row.updated_at
        self._table = PriceTable(self._catalogue, overrides)
        self._updated = updated
        self._cache = {}

    # --- the hot path ------------------------------------------------------------------

    def resolve(self, provider: str, model: str) -> PriceEntry | None:
        """The entry that prices ``model`` on ``provider`` (cached)."""
        key = (provider, model)
        entry = self._cache.get(key, _MISSING)
        if entry is _MISSING:
            entry = self._table.lookup(provider, model) if len(model) <= 256 else None
            if len(self._cache) >= RESOLVE_CACHE_MAX:
                self._cache = {}
            self._cache[key] = entry
        return entry  # type: ignore[return-value]

    def price(
        self, provider: str, model: str | None, usage: Usage, *, request_bytes: int = 0
    ) -> Priced:
        """The cost of one request. ``model`` is the request's model; the
        model the provider says it served (``usage.model``) is priced first
        when it has a price. Unpriced (``cost_usd`` None) when the usage is
        unknown (``reason`` "no_usage") or the model has no price
        ("unknown_model", "no_model"; counted in
        ``lectr_unpriced_requests_total``). ``request_bytes`` (the request
        body's size) gives an estimated response without a prompt count one."""
        if usage.source == "none":
            return UNMETERED
        served = usage.model
        entry = self.resolve(provider, served) if served is not None else None
        if entry is None and model is not None and model != served:
            entry = self.resolve(provider, model)
        if entry is None:
            self._m_unpriced.inc(1, provider)
            reason = "unknown_model" if (model or served) is not None else "no_model"
            return Priced(None, usage.source == "estimated", None, reason=reason)
        return cost_of(entry, usage, request_bytes)

    def worst_case_usd(
        self,
        provider: str,
        model: str | None,
        *,
        prompt_tokens: int,
        max_output_tokens: int | None,
    ) -> Decimal | None:
        """The most a request can cost, for a budget reservation: every
        prompt token at the dearest prompt rate it can be charged (input, or
        a cache write, which costs up to 2x input; over the base rates and
        every service tier the entry lists, since any may serve it), plus
        ``max_output_tokens`` (the request's ``max_tokens``/
        ``max_completion_tokens``/``max_output_tokens``; None: the model's
        limit from the price table) at the dearest output rate. None when the
        model has no price, or when its output is unbounded (no limit in the
        request nor in the table). Web searches are not counted."""
        entry = self._entry(provider, model)
        return None if entry is None else worst_case(entry, prompt_tokens, max_output_tokens)

    def worst_case_micro(
        self,
        provider: str,
        model: str | None,
        *,
        prompt_tokens: int,
        max_output_tokens: int | None,
    ) -> int | None:
        """:meth:`worst_case_usd` in whole micro-dollars, rounded up (what a
        budget reserves), computed on integers only: the proxy's hot path."""
        entry = self._entry(provider, model)
        if entry is None:
            return None
        units = worst_case_units(entry, prompt_tokens, max_output_tokens)
        return None if units is None else -(-units // 1_000_000)

    def dearest_micro(
        self,
        targets: Iterable,
        prompt_tokens: int,
        max_output_tokens: int | None,
        completions: int = 1,
    ) -> int | None:
        """The largest :meth:`worst_case_micro` over ``targets`` (objects with
        ``provider`` and ``model``: a plan's targets), skipping the unpriced
        ones (None: none is priced). What a budget reservation holds for a
        request that may be served by any of them: the proxy's hot path
        (one cached lookup per target, integers only). ``completions``: how
        many completions the request asks for (OpenAI's ``n``), each up to
        the output limit."""
        cache = self._cache  # (resolve's: an entry, or None for an unpriced model)
        prompt = prompt_tokens if prompt_tokens > 0 else 0
        dearest = None
        for t in targets:
            entry = cache.get((t.provider, t.model), _MISSING)
            if entry is _MISSING:
                entry = self._entry(t.provider, t.model)
            if entry is not None:
                units = worst_units(entry.worst, prompt, max_output_tokens, completions)
                if units is not None and (dearest is None or units > dearest):
                    dearest = units
        return None if dearest is None else -(-dearest // 1_000_000)

    def _entry(self, provider: str, model: str | None) -> PriceEntry | None:
        return None if model is None else self.resolve(provider, model)

    def price_record(self, record: UsageRecord) -> UsageRecord:
        """``record`` with its cost (for rows that arrive without one)."""
        priced = self.price(
            record.provider, record.model, record.usage, request_bytes=record.request_bytes
        )
        return replace(record, cost_usd=priced.cost_usd, pricing=priced)

    # --- administration ----------------------------------------------------------------

    def list_prices(self, provider: object = None, model: object = None) -> list[PriceView]:
        """Every price in effect (of one provider); with ``model``, the one
        entry that prices it on ``provider`` (resolution included), if any."""
        try:
            prov = check_provider(provider) if provider not in (None, "") else None
            name = check_model(model) if model not in (None, "") else None
        except PriceError as e:
            raise BadRequest(str(e)) from None
        if name is not None:
            if prov is None:
                raise BadRequest("give the provider with the model")
            entry = self._table.lookup(prov, name)
            return [self._view(entry)] if entry is not None else []
        return [self._view(e) for e in self._table.entries() if prov is None or e.provider == prov]

    def _view(self, entry: PriceEntry) -> PriceView:
        catalogue = None
        if entry.source == "override":
            catalogue = self._table.catalogue_entry(entry.provider, entry.model)
        return PriceView(entry, catalogue, self._updated.get((entry.provider, entry.model)))

    async def set_price(self, provider: object, model: object, prices: object) -> PriceView:
        """Add or replace the override of one model (a custom model when the
        catalogue has none). Every node uses it within a second."""
        try:
            entry = parse_entry(provider, model, prices, source="override")
        except PriceError as e:
            raise BadRequest(str(e)) from None
        await self._need_store().upsert(entry.provider, entry.model, _stored(entry))
        self._log.info(
            "price of {provider}/{model} set: {rates}",
            provider=entry.provider,
            model=entry.model,
            rates=", ".join(f"{k} {format_usd(v)}" for k, v in entry.base.rates().items())
            + "".join(f"; tier {t.name}" for t in entry.tiers)
            + (
                f"; web_search {format_usd(entry.web_search)}/1k"
                if entry.web_search is not None
                else ""
            ),
        )
        await self._refresh(entry.provider)
        return self._view(entry)

    async def unset_price(self, provider: object, model: object) -> PriceView | None:
        """Remove an override; the catalogue entry (if any) applies again
        and is returned."""
        try:
            prov, name = check_provider(provider), check_model(model)
        except PriceError as e:
            raise BadRequest(str(e)) from None
        if not await self._need_store().delete(prov, name):
            raise NotFound("no price override for this provider and model")
        self._log.info("price override of {provider}/{model} removed", provider=prov, model=name)
        await self._refresh(prov)
        entry = self._table.catalogue_entry(prov, name)
        return self._view(entry) if entry is not None else None

    def _need_store(self):
        if self._store is None:
            raise BadRequest("prices cannot be changed on this node")
        return self._store

    async def _refresh(self, provider: str) -> None:
        try:
            await timeout_without_cancel(self._reloader.refresh(provider), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn("prices not reloaded yet ({error})", error=type(e).__name__)
