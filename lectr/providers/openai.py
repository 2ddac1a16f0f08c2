"""OpenAI."""

from __future__ import annotations

import json

from lectr.providers.base import Provider

_TYPES = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "permission": ("permission_error", "permission_denied"),
    "not_found": ("invalid_request_error", "not_found"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "upstream_unavailable": ("api_error", "upstream_unavailable"),
    "upstream_timeout": ("api_error", "upstream_timeout"),
    "internal": ("api_error", "internal_error"),
}


class OpenAI(Provider):
    name = "openai"
    display_name = "OpenAI"
    default_base_url = "https://api.openai.com"
    model_prefixes = (
        "gpt-",
        "chatgpt-",
        "o1",
        "o3",
        "o4",
        "text-embedding-",
        "dall-e-",
        "gpt-image-",
        "whisper-",
        "tts-",
        "omni-moderation-",
        "text-moderation-",
        "codex-",
        "computer-use-",
    )
    auth_header_names = (b"authorization",)

    def auth_headers(self, key: str) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"Authorization", b"Bearer " + key.encode("ascii")),)

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        err_type, code = _TYPES.get(kind, _TYPES["internal"])
        return json.dumps(
            {"error": {"message": message, "type": err_type, "param": None, "code": code}},
            separators=(",", ":"),
        ).encode()
