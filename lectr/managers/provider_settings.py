"""Per-org provider settings: is a provider enabled for the org, and which
models may it use.

Semantics (docs/security.md, "Provider settings"):

- no row for an (org, provider): enabled, every model allowed;
- ``allowed_models`` and ``blocked_models`` hold exact model names or
  ``prefix*`` patterns (a single ``*``, at the end; ``*`` alone matches
  every model); matching ignores case;
- a blocked match always wins; an empty allow list allows every model that
  is not blocked; a non-empty one allows only what it matches;
- a request that names no model (``GET /v1/models``, files…) is not subject
  to the model lists, only to ``enabled``.

:meth:`ProviderSettingsManager.get` is the proxy's hot path: it reads an
in-memory copy of every row, kept current by ``settings:<org>`` notifications
(and ``org:<org>``, for deletions) and fully reloaded after a listener reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.errors import BadRequest, NotFound
from lectr.providers import ProviderRegistry
from lectr.storage.provider_settings import ProviderSettingsRow, ProviderSettingsStore
from lectr.util.deferred import timeout_without_cancel
from lectr.util.validate import parse_uuid
from lectr.vault.reloader import OrgCacheReloader

MAX_PATTERNS = 500
MAX_PATTERN_LENGTH = 200


class _Matcher:
    """Exact names (a set) and prefixes, case-folded."""

    __slots__ = ("exact", "prefixes", "everything")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.exact = frozenset(p.casefold() for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1].casefold() for p in patterns if p.endswith("*"))
        self.everything = "" in self.prefixes

    def __call__(self, folded: str) -> bool:
        return self.everything or folded in self.exact or folded.startswith(self.prefixes)


@lru_cache(maxsize=4096)
def _matcher(patterns: tuple[str, ...]) -> _Matcher:
    # settings objects are rebuilt on every reload; their compiled lists are shared
    return _Matcher(patterns)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    org_id: str
    provider: str
    enabled: bool
    allowed_models: tuple[str, ...]  # exact names or "prefix*" patterns; empty = all allowed
    blocked_models: tuple[str, ...]  # block wins over allow
    updated_at: datetime | None  # None when no row exists (defaults)

    def allows_model(self, model: str | None) -> bool:
        """Whether the model lists let ``model`` through (``enabled`` is
        checked separately). A request without a model is allowed."""
        if model is None or not (self.blocked_models or self.allowed_models):
            return True
        folded = model.casefold()
        if self.blocked_models and _matcher(self.blocked_models)(folded):
            return False
        return not self.allowed_models or _matcher(self.allowed_models)(folded)


def default_settings(org_id: str, provider: str) -> ProviderSettings:
    return ProviderSettings(org_id, provider, True, (), (), None)


def _settings(row: ProviderSettingsRow) -> ProviderSettings:
    return ProviderSettings(
        row.org_id,
        row.provider,
        row.enabled,
        row.allowed_models,
        row.blocked_models,
        row.updated_at,
    )


def clean_patterns(value: object, what: str) -> list[str]:
    """A list of model patterns: strings without whitespace or control
    characters, a ``*`` only at the end; trimmed, duplicates dropped."""
    if not isinstance(value, list | tuple):
        raise BadRequest(f"{what} must be a list of model names or 'prefix*' patterns")
    if len(value) > MAX_PATTERNS:
        raise BadRequest(f"{what} may hold at most {MAX_PATTERNS} patterns")
    out: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str):
            raise BadRequest(f"{what} must contain only strings")
        pattern = item.strip()
        if not 1 <= len(pattern) <= MAX_PATTERN_LENGTH:
            raise BadRequest(f"{what}: each pattern must be 1 to {MAX_PATTERN_LENGTH} characters")
        if any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in pattern):
            raise BadRequest(f"{what}: patterns must not contain whitespace or control characters")
        if "*" in pattern[:-1]:
            raise BadRequest(
                f"{what}: '*' may only end a pattern ('gpt-4o*'), got {pattern[:60]!r}"
            )
        out[pattern] = None
    return list(out)


class ProviderSettingsManager:
    _log = Logger()

    def __init__(
        self,
        store: ProviderSettingsStore,
        registry: ProviderRegistry,
        listener,
        reactor,
    ) -> None:
        self._store = store
        self._registry = registry
        self._listener = listener
        self._reactor = reactor
        self._cache: dict[tuple[str, str], ProviderSettings] = {}
        self._orgs: dict[str, set[str]] = {}  # org id -> providers with a row
        self._reloader = OrgCacheReloader(
            "provider settings",
            load_orgs=self._load_orgs,
            load_all=self._load_all,
            reactor=reactor,
        )

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load every row into memory and follow changes."""
        if self._listener is not None:
            self._listener.subscribe("settings", self._reloader.org_changed)
            self._listener.subscribe("org", self._reloader.org_changed)
            self._listener.on_reset(self._reloader.reset)
        await self._load_all()
        self._reloader.start()
        self._log.info("provider settings: {n} rows loaded", n=len(self._cache))

    async def stop(self) -> None:
        self._reloader.stop()

    # --- the hot path ---------------------------------------------------------------

    def get(self, org_id: str, provider: str) -> ProviderSettings:
        """The settings in effect; defaults when the org has no row for the
        provider. Never touches the database."""
        settings = self._cache.get((org_id, provider))
        return settings if settings is not None else default_settings(org_id, provider)

    def stored(self, org_id: str, provider: str) -> ProviderSettings | None:
        """The org's own settings for the provider, or None when the defaults
        apply (enabled, every model allowed): the proxy's check, which makes
        no object for the common case."""
        return self._cache.get((org_id, provider))

    # --- the cache -----------------------------------------------------------------

    async def _load_all(self) -> None:
        rows = await self._store.load()
        cache: dict[tuple[str, str], ProviderSettings] = {}
        orgs: dict[str, set[str]] = {}
        for row in rows:
            cache[(row.org_id, row.provider)] = _settings(row)
            orgs.setdefault(row.org_id, set()).add(row.provider)
        self._cache, self._orgs = cache, orgs

    async def _load_orgs(self, org_ids: list[str]) -> None:
        rows = await self._store.load(org_ids)
        for org_id in org_ids:
            for provider in self._orgs.pop(org_id, ()):
                self._cache.pop((org_id, provider), None)
        for row in rows:
            self._cache[(row.org_id, row.provider)] = _settings(row)
            self._orgs.setdefault(row.org_id, set()).add(row.provider)

    # --- administration ----------------------------------------------------------------

    async def list(self, org_id: object) -> list[ProviderSettings]:
        """One entry per provider Lectr serves, in the registry's order, as
        stored (read from the database, not the cache)."""
        org_id = parse_uuid(org_id, "organization")
        if not await self._store.org_exists(org_id):
            raise NotFound("organization not found")
        rows = {r.provider: _settings(r) for r in await self._store.load([org_id])}
        return [rows.get(name) or default_settings(org_id, name) for name in self._registry.names()]

    async def update(
        self,
        org_id: object,
        provider: object,
        *,
        enabled: object = None,
        allowed_models: object = None,
        blocked_models: object = None,
    ) -> ProviderSettings:
        """Change some of an org's settings for one provider; the others keep
        their values. Every node applies the change when the notification
        arrives (well under a second)."""
        org_id = parse_uuid(org_id, "organization")
        if not isinstance(provider, str) or provider not in self._registry:
            raise NotFound("provider not found")
        if enabled is not None and not isinstance(enabled, bool):
            raise BadRequest("enabled must be true or false")
        allowed = (
            None if allowed_models is None else clean_patterns(allowed_models, "allowed_models")
        )
        blocked = (
            None if blocked_models is None else clean_patterns(blocked_models, "blocked_models")
        )
        row = await self._store.upsert(
            org_id, provider, enabled=enabled, allowed_models=allowed, blocked_models=blocked
        )
        if row is None:
            raise NotFound("organization not found")
        self._log.info(
            "provider settings of org {org_id} for {provider} changed: enabled={enabled}, "
            "{allowed} allowed and {blocked} blocked model patterns",
            org_id=org_id,
            provider=provider,
            enabled=row.enabled,
            allowed=len(row.allowed_models),
            blocked=len(row.blocked_models),
        )
        try:
            await timeout_without_cancel(self._reloader.refresh(org_id), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn(
                "provider settings cache of org {org_id} not refreshed yet ({error})",
                org_id=org_id,
                error=type(e).__name__,
            )
        return _settings(row)
