"""The provider catalogue of one process: the built-in providers (with the
base URLs configured for them) and the custom providers a global admin made.

:func:`discover` finds the built-ins: every module of
:mod:`lectr.providers.catalogue` (and of any ``lectr/providers/catalogue``
directory elsewhere on ``sys.path``) that defines ``PROVIDERS``. Adding a
provider is adding a module there; the router, the policy chain, the meters,
the admin API (schemas, OpenAPI) and the CLI read this registry.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys

from lectr.providers.base import CREDENTIAL_HEADERS, Provider

#: provider names are route prefixes: lower-case, short, and never one of
#: Lectr's own paths
NAME_RE = re.compile(r"[a-z][a-z0-9-]{1,31}")
RESERVED_NAMES = frozenset({"v1", "v2", "healthz", "readyz", "metrics", "admin", "lectr", "api"})


def discover() -> list[type[Provider]]:
    """The built-in provider classes, in listing order (``order``, then name)."""
    from lectr.providers import catalogue

    # every lectr/providers/catalogue directory on the path joins the package
    for entry in sys.path:
        extra = os.path.join(entry or os.curdir, "lectr", "providers", "catalogue")
        if os.path.isdir(extra) and not any(os.path.samefile(extra, p) for p in catalogue.__path__):
            catalogue.__path__.append(extra)
    found: dict[str, type[Provider]] = {}
    for module in pkgutil.iter_modules(catalogue.__path__, catalogue.__name__ + "."):
        mod = importlib.import_module(module.name)
        for cls in getattr(mod, "PROVIDERS", ()):
            if not NAME_RE.fullmatch(cls.name) or cls.name in RESERVED_NAMES:
                raise ValueError(f"{module.name}: invalid provider name {cls.name!r}")
            if cls.name in found and found[cls.name] is not cls:
                raise ValueError(f"{module.name}: provider {cls.name!r} is defined twice")
            found[cls.name] = cls
    return sorted(found.values(), key=lambda c: (c.order, c.name))


class ProviderRegistry:
    """Providers by name. Built-ins are fixed for the life of the process;
    custom providers are replaced as a whole when their rows change
    (:meth:`set_custom`)."""

    def __init__(self, builtins: list[Provider], custom: list[Provider] = ()) -> None:
        self._builtins = {p.name: p for p in builtins}
        self._by_name: dict[str, Provider] = {}
        self._route: dict[bytes, Provider] = {}
        self.credential_headers: frozenset[bytes] = CREDENTIAL_HEADERS
        self.set_custom(list(custom))

    @classmethod
    def from_config(cls, config) -> ProviderRegistry:
        urls = config.provider_base_urls
        return cls([c(urls.get(c.name)) for c in discover()])

    def set_custom(self, custom: list[Provider]) -> None:
        by_name = dict(self._builtins)
        for p in custom:
            if p.name not in by_name:  # a built-in always wins
                by_name[p.name] = p
        self._by_name = by_name
        self._route = {p.name.encode("ascii"): p for p in by_name.values()}
        names = set(CREDENTIAL_HEADERS)
        for p in by_name.values():
            names.update(p.credential_headers)
        self.credential_headers = frozenset(names)

    # --- lookups ------------------------------------------------------------------------

    def get(self, name: str) -> Provider | None:
        return self._by_name.get(name)

    def by_prefix(self, segment: bytes) -> Provider | None:
        """The provider whose route prefix is ``/<segment>/``."""
        return self._route.get(segment)

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def builtin_names(self) -> list[str]:
        return list(self._builtins)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def __iter__(self):
        return iter(list(self._by_name.values()))
