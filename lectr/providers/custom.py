"""Custom providers: upstreams a global admin adds at run time (a
self-hosted vLLM or Ollama, a regional or private endpoint), stored in
``custom_providers`` and served on ``/<name>/v1/…`` like the built-ins.

A custom provider speaks one of the two dialects, authenticates with one
header scheme, and forwards API paths as they are (``<base URL>/v1/…``).
Keys cannot carry their own base URL: only a global admin chooses where a
custom provider's traffic goes.
"""

from __future__ import annotations

from lectr.providers.base import API_KEY, BEARER, X_API_KEY, Provider
from lectr.providers.dialects import DIALECTS
from lectr.usage.stream_usage import NO_STREAM_USAGE

AUTH_SCHEMES = {"bearer": BEARER, "x-api-key": X_API_KEY, "api-key": API_KEY}


class CustomProvider(Provider):
    custom = True
    stream_usage_paths = NO_STREAM_USAGE  # never alter bodies for an unknown server

    def __init__(
        self,
        name: str,
        *,
        display_name: str,
        dialect: str,
        base_url: str,
        auth: str,
        models_path: str = "/v1/models",
    ) -> None:
        super().__init__(base_url)
        self.name = name
        self.display_name = display_name
        self.dialect = DIALECTS[dialect]
        self.auth = AUTH_SCHEMES[auth]
        self.auth_scheme = auth
        self.models_path = models_path.encode("ascii")

    @classmethod
    def from_row(cls, row) -> CustomProvider:
        return cls(
            row.name,
            display_name=row.display_name,
            dialect=row.dialect,
            base_url=row.base_url,
            auth=row.auth,
            models_path=row.models_path,
        )
