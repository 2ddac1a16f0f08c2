"""Routes: an org's virtual models (DESIGN §9).

``PUT /admin/orgs/{id}/routes/{name}`` stores ``{"targets": [{"provider",
"model", "weight"?}…], "strategy": "fallback"|"weighted", "retry_on": […],
"max_attempts": N, "attempt_timeout": seconds?}``; a request whose model is
the route's name is sent to its targets (model rewritten per target).

:meth:`RouteManager.get` is the proxy's hot path: every org's routes are held
in memory, kept current by ``routes:<org>`` notifications (and ``org:<org>``
for deletions), fully reloaded after a listener reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.errors import BadRequest, NotFound
from lectr.providers.body import BodyRefused, check_model
from lectr.providers.registry import ProviderRegistry
from lectr.storage.custom_providers import ProviderGone
from lectr.storage.routes import RouteRow, RouteStore, TooManyRoutes
from lectr.util.deferred import timeout_without_cancel
from lectr.util.validate import parse_uuid
from lectr.vault.reloader import OrgCacheReloader

STRATEGIES = ("fallback", "weighted")
#: what makes a route try its next target: the provider's 429, any 5xx, no
#: response headers in time, no connection
RETRY_ON = ("429", "5xx", "timeout", "connect")
MAX_TARGETS = 10
MAX_ATTEMPTS = 10
MAX_ROUTES_PER_ORG = 500


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str | None  # None: a request that names no model (files, model lists)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Route:
    org_id: str
    name: str
    targets: tuple[Target, ...]
    strategy: str
    retry_on: frozenset[str]
    max_attempts: int
    attempt_timeout: float | None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def view(self) -> dict:
        return {
            "name": self.name,
            "targets": [
                {"provider": t.provider, "model": t.model, "weight": t.weight} for t in self.targets
            ],
            "strategy": self.strategy,
            "retry_on": [r for r in RETRY_ON if r in self.retry_on],
            "max_attempts": self.max_attempts,
            "attempt_timeout": self.attempt_timeout,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _route(row: RouteRow) -> Route:
    targets = tuple(Target(t["provider"], t["model"], int(t.get("weight", 1))) for t in row.targets)
    return Route(
        row.org_id,
        row.name,
        targets,
        row.strategy,
        frozenset(row.retry_on),
        row.max_attempts,
        row.attempt_timeout,
        row.created_at,
        row.updated_at,
    )


def check_route_name(name: object) -> str:
    """A route name is what clients send as ``model``: printable, no ``/``
    (that would read as ``provider/model``), no surrounding spaces."""
    try:
        name = check_model(name)
    except BodyRefused as e:
        raise BadRequest(str(e).replace("'model'", "the route name")) from None
    if "/" in name or name != name.strip():
        raise BadRequest("the route name must not contain '/' or surrounding spaces")
    return name


class RouteManager:
    _log = Logger()

    def __init__(self, store: RouteStore, registry: ProviderRegistry, listener, reactor) -> None:
        self._store = store
        self._registry = registry
        self._listener = listener
        self._reactor = reactor
        self._cache: dict[str, dict[str, Route]] = {}
        self._reloader = OrgCacheReloader(
            "routes", load_orgs=self._load_orgs, load_all=self._load_all, reactor=reactor
        )

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._listener is not None:
            self._listener.subscribe("routes", self._reloader.org_changed)
            self._listener.subscribe("org", self._reloader.org_changed)
            self._listener.on_reset(self._reloader.reset)
        await self._load_all()
        self._reloader.start()
        self._log.info(
            "routes: {n} routes of {orgs} orgs loaded",
            n=sum(len(r) for r in self._cache.values()),
            orgs=len(self._cache),
        )

    async def stop(self) -> None:
        self._reloader.stop()

    # --- the hot path ---------------------------------------------------------------

    def get(self, org_id: str, name: str) -> Route | None:
        routes = self._cache.get(org_id)
        return routes.get(name) if routes else None

    def has_routes(self, org_id: str) -> bool:
        return org_id in self._cache

    # --- the cache -----------------------------------------------------------------

    async def _load_all(self) -> None:
        cache: dict[str, dict[str, Route]] = {}
        for row in await self._store.load():
            cache.setdefault(row.org_id, {})[row.name] = _route(row)
        self._cache = cache

    async def _load_orgs(self, org_ids: list[str]) -> None:
        rows = await self._store.load(org_ids)
        for org_id in org_ids:
            self._cache.pop(org_id, None)
        for row in rows:
            self._cache.setdefault(row.org_id, {})[row.name] = _route(row)

    async def _refresh(self, org_id: str) -> None:
        try:
            await timeout_without_cancel(self._reloader.refresh(org_id), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:  # the write is committed; the reloader retries
            self._log.warn(
                "routes cache of org {org_id} not refreshed yet ({error})",
                org_id=org_id,
                error=type(e).__name__,
            )

    # --- administration ------------------------------------------------------------------

    async def list(self, org_id: object) -> list[Route]:
        org_id = parse_uuid(org_id, "organization")
        rows = await self._store.load([org_id])
        if not rows and not await self._store.org_exists(org_id):
            raise NotFound("organization not found")
        return [_route(r) for r in rows]

    async def put(self, org_id: object, name: object, body: dict) -> tuple[Route, bool]:
        """Create or replace a route; returns it and whether it is new."""
        org_id = parse_uuid(org_id, "organization")
        name = check_route_name(name)
        targets = self._targets(body.get("targets"))
        strategy = body.get("strategy", "fallback")
        if strategy not in STRATEGIES:
            raise BadRequest(f"strategy must be one of: {', '.join(STRATEGIES)}")
        retry_on = body.get("retry_on", list(RETRY_ON))
        if not isinstance(retry_on, list) or any(r not in RETRY_ON for r in retry_on):
            raise BadRequest(f"retry_on must be a list of: {', '.join(RETRY_ON)}")
        default_attempts = min(MAX_ATTEMPTS, max(3, len(targets)))
        max_attempts = body.get("max_attempts", default_attempts)
        if type(max_attempts) is not int or not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise BadRequest(f"max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}")
        timeout = body.get("attempt_timeout")
        if timeout is not None and (
            type(timeout) not in (int, float) or not 0.1 <= timeout <= 3600
        ):
            raise BadRequest("attempt_timeout must be a number of seconds from 0.1 to 3600")
        # the cap is checked in the transaction that stores the route (the
        # cache may lag behind other admin calls and nodes)
        cap = MAX_ROUTES_PER_ORG
        upsert = self._store.upsert(
            org_id,
            name,
            targets=[
                {"provider": t.provider, "model": t.model, "weight": t.weight} for t in targets
            ],
            strategy=strategy,
            retry_on=[r for r in RETRY_ON if r in retry_on],
            max_attempts=max_attempts,
            attempt_timeout=None if timeout is None else float(timeout),
            max_routes=cap,
            custom=[t.provider for t in targets if not self._registry.is_builtin(t.provider)],
        )
        try:
            result = await upsert
        except ProviderGone as e:
            raise NotFound(f"provider not found (deleted meanwhile): {e}") from None
        except TooManyRoutes:
            raise BadRequest(f"an org may have at most {cap} routes") from None
        if result is None:
            raise NotFound("organization not found")
        row, created = result
        self._log.info(
            "route {name!r} of org {org_id} {what}: {n} targets, {strategy}",
            name=name,
            org_id=org_id,
            what="created" if created else "replaced",
            n=len(targets),
            strategy=strategy,
        )
        await self._refresh(org_id)
        return _route(row), created

    def _targets(self, value: object) -> list[Target]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGETS:
            raise BadRequest(f"targets must be a list of 1 to {MAX_TARGETS} targets")
        targets: list[Target] = []
        dialects = set()
        for i, item in enumerate(value):
            if not isinstance(item, dict) or set(item) - {"provider", "model", "weight"}:
                raise BadRequest(f"targets[{i}] must be {{'provider', 'model', 'weight'?}}")
            provider = (
                self._registry.get(item.get("provider"))
                if isinstance(item.get("provider"), str)
                else None
            )
            if provider is None:
                raise BadRequest(
                    f"targets[{i}].provider is unknown; expected one of: "
                    f"{', '.join(self._registry.names())}"
                )
            try:
                model = check_model(item.get("model"))
            except BodyRefused as e:
                raise BadRequest(f"targets[{i}].model: {e}") from None
            weight = item.get("weight", 1)
            if type(weight) is not int or not 1 <= weight <= 1000:
                raise BadRequest(f"targets[{i}].weight must be a whole number from 1 to 1000")
            dialects.add(provider.dialect.name)
            targets.append(Target(provider.name, model, weight))
        if len(dialects) > 1:
            raise BadRequest(
                "every target of a route must speak one API dialect (openai or anthropic): "
                "Lectr does not translate between them"
            )
        return targets

    async def delete(self, org_id: object, name: object) -> None:
        org_id = parse_uuid(org_id, "organization")
        if not isinstance(name, str) or not await self._store.delete(org_id, name):
            raise NotFound("route not found")
        self._log.info("route {name!r} of org {org_id} deleted", name=name, org_id=org_id)
        await self._refresh(org_id)
