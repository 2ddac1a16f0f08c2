"""Anthropic."""

from __future__ import annotations

import json

from lectr.providers.base import Provider

_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "upstream_unavailable": "api_error",
    "upstream_timeout": "timeout_error",
    "internal": "api_error",
}

API_VERSION = b"2023-06-01"


class Anthropic(Provider):
    name = "anthropic"
    display_name = "Anthropic"
    default_base_url = "https://api.anthropic.com"
    model_prefixes = ("claude-",)
    auth_header_names = (b"x-api-key",)
    validation_headers = ((b"anthropic-version", API_VERSION),)

    def auth_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-api-key", key.encode("ascii")),)

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        doc: dict = {
            "type": "error",
            "error": {"type": _TYPES.get(kind, "api_error"), "message": message},
        }
        if request_id:
            doc["request_id"] = request_id
        return json.dumps(doc, separators=(",", ":")).encode()
