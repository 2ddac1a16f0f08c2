"""Custom providers (DESIGN §8): upstreams a global admin adds at run time.

Rows live in ``custom_providers``; every node holds them in its
:class:`~lectr.providers.registry.ProviderRegistry`, reloaded on each
``provider:<name>`` notification and after a listener reset, so a new
provider serves ``/<name>/v1/…`` on every node within a second.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from lectr.errors import BadRequest, Conflict, NotFound
from lectr.managers.vault import check_base_url
from lectr.providers.custom import AUTH_SCHEMES, CustomProvider
from lectr.providers.dialects import DIALECTS
from lectr.providers.registry import NAME_RE, RESERVED_NAMES, ProviderRegistry
from lectr.storage.custom_providers import CustomProviderRow, CustomProviderStore
from lectr.util.deferred import timeout_without_cancel
from lectr.util.validate import clean_name
from lectr.vault.reloader import OrgCacheReloader


def check_models_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 200:
        raise BadRequest("models_path must be an absolute path such as /v1/models")
    if not value.isascii() or any(c.isspace() or ord(c) < 0x21 or c in "\\%#?" for c in value):
        raise BadRequest("models_path must be a plain ASCII path")
    if "/." in value or "//" in value:
        raise BadRequest("models_path must not contain dot segments or empty segments")
    return value


class CustomProviderManager:
    _log = Logger()

    def __init__(
        self, store: CustomProviderStore, registry: ProviderRegistry, listener, reactor
    ) -> None:
        self._store = store
        self._registry = registry
        self._listener = listener
        self._reactor = reactor
        self._rows: dict[str, CustomProviderRow] = {}
        self._reloader = OrgCacheReloader(
            "custom providers",
            load_orgs=lambda _names: self._load_all(),
            load_all=self._load_all,
            reactor=reactor,
        )

    async def start(self) -> None:
        if self._listener is not None:
            self._listener.subscribe("provider", self._reloader.org_changed)
            self._listener.on_reset(self._reloader.reset)
        await self._load_all()
        self._reloader.start()
        if self._rows:
            self._log.info(
                "custom providers: {names}",
                names=", ".join(f"{r.name} ({r.base_url})" for r in self._rows.values()),
            )

    async def stop(self) -> None:
        self._reloader.stop()

    async def _load_all(self) -> None:
        rows = await self._store.load()
        self._rows = {r.name: r for r in rows}
        self._registry.set_custom([CustomProvider.from_row(r) for r in rows])

    async def _refresh(self) -> None:
        try:
            await timeout_without_cancel(self._reloader.refresh("*"), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:  # committed either way; the reloader retries
            self._log.warn("custom providers not reloaded yet ({error})", error=type(e).__name__)

    # --- administration ----------------------------------------------------------------

    def row(self, name: str) -> CustomProviderRow | None:
        return self._rows.get(name)

    async def put(self, body: dict, *, replace: bool = True) -> tuple[CustomProviderRow, bool]:
        """Create or replace a custom provider; returns it and whether it is
        new. With ``replace`` False, a name already taken is a 409."""
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise BadRequest(
                "name must be 2 to 32 characters: lower-case letters, digits and '-', "
                "starting with a letter (it becomes the route prefix /<name>/v1)"
            )
        if name in RESERVED_NAMES or self._registry.is_builtin(name):
            raise Conflict(f"'{name}' is a built-in provider or a reserved name")
        display = clean_name(body.get("display_name", name), "display_name")
        dialect = body.get("dialect")
        if dialect not in DIALECTS:
            raise BadRequest(f"dialect must be one of: {', '.join(DIALECTS)}")
        base_url = check_base_url(body.get("base_url"))
        if base_url.endswith("/v1"):
            raise BadRequest(
                "base_url must not end with /v1: Lectr sends /v1/... paths after it "
                f"(use {base_url[:-3]!r})"
            )
        auth = body.get("auth", "bearer")
        if auth not in AUTH_SCHEMES:
            raise BadRequest(f"auth must be one of: {', '.join(AUTH_SCHEMES)}")
        models_path = check_models_path(body.get("models_path", "/v1/models"))
        result = await self._store.upsert(
            name, display, dialect, base_url, auth, models_path, replace=replace
        )
        if result is None:
            raise Conflict(f"provider '{name}' exists; PUT it to replace it")
        row, created = result
        self._log.info(
            "custom provider {name} {what}: {dialect} dialect at {base_url}",
            name=name,
            what="created" if created else "replaced",
            dialect=dialect,
            base_url=base_url,
        )
        await self._refresh()
        return row, created

    async def delete(self, name: object) -> None:
        if not isinstance(name, str) or name not in self._rows:
            if isinstance(name, str) and self._registry.is_builtin(name):
                raise Conflict("built-in providers cannot be deleted")
            raise NotFound("provider not found")
        used = await self._store.delete(name)  # (checks what uses it, in its transaction)
        if used is None:
            raise NotFound("provider not found")
        keys, routes = used
        if keys or routes:
            raise Conflict(
                f"provider '{name}' is still used by {keys} provider key(s) and {routes} "
                "route(s); delete those first"
            )
        self._log.info("custom provider {name} deleted", name=name)
        await self._refresh()
