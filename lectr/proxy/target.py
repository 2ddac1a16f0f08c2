"""The request target: checked once, before any work, then routed.

A target the upstream client would refuse, or that a provider (or a proxy
in front of it) could resolve to another path than the one Lectr judged, is
a 400 before routing, authentication or any upstream call:

- only visible ASCII (no control bytes, no space, no DEL, nothing >= 0x80),
  no fragment (``#``), well-formed percent-encoding everywhere;
- in the path: no backslash, no empty segment (``//``), no dot segment
  (``.``/``..``), no ``;`` (path parameters: ``..;/`` is a dot segment to
  some servers), and no percent-encoded dot, slash, backslash, percent or
  NUL (``%2e``, ``%2f``, ``%5c``, ``%25``, ``%00``): none is needed by a
  provider API, and each is a way to leave the provider's path prefix.

Routes (DESIGN §3, §8): ``/<provider>/v1/<rest>`` for every provider in the
catalogue; ``/v1/<rest>`` goes to Anthropic when the request has an
``anthropic-version`` header or ``<rest>`` starts with ``messages``, else to
OpenAI (and an OpenAI-shaped body may then name ``"<provider>/<model>"``).
"""

from __future__ import annotations

import re

# Visible ASCII without '#', and every '%' followed by two hex digits.
_TARGET_RE = re.compile(rb"/(?:[\x21-\x22\x24\x26-\x7e]|%[0-9A-Fa-f]{2})*")
_BAD_ESCAPE_RE = re.compile(rb"%(?:2[eEfF5]|5[cC]|00)")
_DOT_SEGMENT_RE = re.compile(rb"(?:^|/)\.{1,2}(?:/|$)")


def target_problem(target: bytes, *, syntax_checked: bool = False) -> str | None:
    """Why a request target is refused (a message for the client), or None.
    ``syntax_checked``: the HTTP server already refused every target that is
    not visible ASCII with well-formed escapes (lectr.http.server does), so
    only the path rules are left to check."""
    path, _, query = target.partition(b"?")
    if not syntax_checked and (
        not _TARGET_RE.fullmatch(path) or (query and not _TARGET_RE.fullmatch(b"/" + query))
    ):
        return (
            "The request target must be visible ASCII with well-formed percent-encoding "
            "(no control bytes, spaces, fragments or raw non-ASCII bytes)."
        )
    if b"\\" in path or b"//" in path or b";" in path:
        return "The request path must not contain backslashes, empty segments or ';'."
    if b"." in path and _DOT_SEGMENT_RE.search(path):
        return "The request path must not contain '.' or '..' segments."
    if b"%" in path and _BAD_ESCAPE_RE.search(path):
        return (
            "The request path must not percent-encode '.', '/', '\\', '%' or NUL "
            "(%2e, %2f, %5c, %25, %00)."
        )
    return None


class Entry:
    """Where a path enters: the provider its prefix names (or the default
    provider of ``/v1``), and the API path below it (``/v1/<rest>``)."""

    __slots__ = ("provider", "api_path", "auto")

    def __init__(self, provider, api_path: bytes, auto: bool) -> None:
        self.provider = provider
        self.api_path = api_path
        self.auto = auto  # the bare /v1 root: a body may still choose the provider


def _is_api_path(rest: bytes) -> bool:
    return rest == b"/v1" or rest.startswith(b"/v1/")


def route(path: bytes, has_anthropic_version: bool, registry) -> Entry | None:
    """The entry of a (checked) path, or None for an unknown route."""
    if _is_api_path(path):
        rest = path[3:]
        if has_anthropic_version or rest.startswith(b"/messages"):
            return Entry(registry.get("anthropic"), path, True)
        return Entry(registry.get("openai"), path, True)
    slash = path.find(b"/", 1)
    if slash < 0:
        return None
    provider = registry.by_prefix(path[1:slash])
    if provider is None or not _is_api_path(path[slash:]):
        return None
    return Entry(provider, path[slash:], False)


def error_provider(path: bytes, registry):
    """The provider whose error format suits a path that could not be
    routed (its prefix's provider when it names one; else OpenAI's)."""
    slash = path.find(b"/", 1)
    provider = registry.by_prefix(path[1:slash]) if slash > 0 else None
    return provider or registry.get("openai")
