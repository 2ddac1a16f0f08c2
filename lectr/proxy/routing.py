"""Which provider a proxy path goes to (DESIGN §3).

``/openai/v1/<rest>`` → OpenAI ``/v1/<rest>``; ``/anthropic/v1/<rest>`` →
Anthropic ``/v1/<rest>``; ``/v1/<rest>`` → Anthropic when the request has an
``anthropic-version`` header or ``<rest>`` starts with ``messages``, else
OpenAI. Any method, any path below a provider; the query string is kept.
"""

from __future__ import annotations

from typing import NamedTuple


class Route(NamedTuple):
    provider: str
    path: bytes  # provider path without the query: b"/v1/chat/completions"


def route(path: bytes, has_anthropic_version: bool) -> Route | None:
    if path.startswith(b"/v1"):
        rest = path[3:]
        if rest and rest[:1] != b"/":
            return None
        if has_anthropic_version or rest.startswith(b"/messages"):
            return Route("anthropic", path)
        return Route("openai", path)
    if path.startswith(b"/openai/v1"):
        rest = path[10:]
        if rest and rest[:1] != b"/":
            return None
        return Route("openai", path[7:])
    if path.startswith(b"/anthropic/v1"):
        rest = path[13:]
        if rest and rest[:1] != b"/":
            return None
        return Route("anthropic", path[10:])
    return None


def dialect_for(path: bytes) -> str:
    """The provider whose error format suits an unroutable path."""
    return "anthropic" if path.startswith(b"/anthropic") else "openai"
