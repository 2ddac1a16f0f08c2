"""API dialects: the request shape, error format, stream format and usage
fields a provider speaks. Every built-in provider speaks ``openai`` except
Anthropic; a custom provider names one of the two.

A dialect answers for everything that is about the *shape* of the traffic:

- :meth:`Dialect.error_body`: Lectr's own errors, in the body the dialect's
  SDKs parse into their usual exceptions;
- :meth:`Dialect.plan`: what a judged request asks for and the bytes to send
  (:func:`lectr.usage.meters.plan_request`);
- :meth:`Dialect.meter`: the usage meter for a response
  (:func:`lectr.usage.meters.meter_for`);
- :meth:`Dialect.session_key` and :meth:`Dialect.cache_prefix`: what makes
  two requests part of one conversation, for cache-affine key selection.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import urlsplit

from lectr.providers.body import ReadBody
from lectr.usage.meters import RequestPlan, meter_for, plan_request
from lectr.usage.model import Meter

# Lectr's error kinds and their HTTP status (the dialects map them to their
# own error types).
ERROR_STATUS = {
    "invalid_request": 400,
    "authentication": 401,
    "permission": 403,
    "not_found": 404,
    "timeout": 408,
    "too_large": 413,
    "rate_limited": 429,
    "budget_exceeded": 429,
    "internal": 500,
    "upstream_unavailable": 502,
    "unavailable": 503,
    "upstream_timeout": 504,
}

#: OpenAI caches prompts from this many tokens on
OPENAI_CACHE_MIN_TOKENS = 1024
#: bytes per token assumed when a prompt's length must be guessed
BYTES_PER_TOKEN = 4
_PREFIX_BYTES = OPENAI_CACHE_MIN_TOKENS * BYTES_PER_TOKEN
# compact, as the provider reads it; a prompt's lone surrogates (valid JSON
# escapes) are kept as they are ("surrogatepass") when hashed
_PREFIX_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


#: Anthropic answers that carry a batch's ``results_url``
_BATCH_ANSWERS = re.compile(r"/v1/messages/batches(?:/[^/]+(?:/cancel)?)?")
_BATCHES_PATH = "/v1/messages/batches/"


def relative_results_urls(body: bytes) -> bytes:
    """An Anthropic batch answer (one batch, or a page in ``data``) with each
    ``results_url`` made an absolute path (:func:`_relative`): its path from
    ``/v1/messages/batches/`` on, and its query.

    Anthropic names a batch's results by a URL on its own origin
    (``https://api.anthropic.com/v1/messages/batches/<id>/results``), and
    its SDKs fetch that URL as given, with the client's credentials: through
    Lectr, the Lectr key, sent to the provider around Lectr (and the call
    refused). A relative URL is joined to the client's base URL (Lectr's,
    with any ``/anthropic`` prefix), so the results are fetched through
    Lectr, with the org's key. Anything that is not such JSON is returned
    unchanged."""
    if b"results_url" not in body:
        return body
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(doc, dict):
        return body
    data = doc.get("data")
    items = data if isinstance(data, list) else [doc]
    changed = False
    for item in items:
        url = item.get("results_url") if isinstance(item, dict) else None
        if isinstance(url, str):
            relative = _relative(url)
            if relative != url:
                item["results_url"] = relative
                changed = True
    if not changed:
        return body
    out = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    try:
        return out.encode()
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, "\ud800"): escaped again
        return json.dumps(doc, separators=(",", ":")).encode()


#: a relative results_url passed on as it is: an absolute path, which every
#: client keeps on Lectr's origin, whether it resolves it against its base URL
#: or appends it to its base URL as text (the TypeScript SDK's buildURL:
#: ``http://lectr:8080`` + ``@evil.example/x`` is a URL on evil.example);
#: not ``//`` nor ``/\\`` (WHATWG reads a backslash as a slash), tabs and line
#: breaks aside (URL parsers drop them)
_PATH_ABSOLUTE = re.compile(r"/(?![/\\\t\n\r])[^\t\n\r]*\Z")


def _relative(url: str) -> str:
    """``url`` as an absolute path on Lectr: from the batches path on when it
    has one (with its query), else its own path, never starting with two
    slashes."""
    if _PATH_ABSOLUTE.match(url) is not None:
        return url  # relative already
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""  # (not a URL a client could follow either)
    at = parts.path.find(_BATCHES_PATH)
    path = parts.path[at:] if at >= 0 else "/" + parts.path.lstrip("/\\")
    return f"{path}?{parts.query}" if parts.query else path


def _text(value: object, limit: int = 512) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _prefix_text(value: object, room: int, out: list[str]) -> int:
    """Append to ``out`` the start of ``value``'s compact serialisation
    (``_PREFIX_ENCODER``'s, character for character): all of it, or at least
    ``room`` characters when it is longer, so that a prompt's prefix costs
    what the prefix holds, not what the whole prompt does (one 15 MiB
    string, or a list of millions of values, is not serialised whole).
    Returns the characters appended; a value cut short is not closed."""
    if isinstance(value, str):
        text = _PREFIX_ENCODER.encode(value if len(value) <= room else value[:room])
        if len(value) > room:
            text = text[:-1]  # (cut: its closing quote is not the serialisation's)
        out.append(text)
        return len(text)
    if isinstance(value, list | dict):
        is_dict = isinstance(value, dict)
        out.append("{" if is_dict else "[")
        n = 1
        for i, item in enumerate(value.items() if is_dict else value):
            if n >= room:
                return n
            if i:
                out.append(",")
                n += 1
            if is_dict:
                key, item = item
                n += _prefix_text(key, room - n, out)
                if n >= room:
                    return n
                out.append(":")
                n += 1
            n += _prefix_text(item, room - n, out)
        if n >= room:
            return n  # (its last item may be cut: no closing bracket)
        out.append("}" if is_dict else "]")
        return n + 1
    text = _PREFIX_ENCODER.encode(value)  # (a number, true, false, null)
    out.append(text)
    return len(text)


class Dialect:
    name: ClassVar[str]
    title: ClassVar[str]  # for messages: "OpenAI"

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        raise NotImplementedError

    def error_message(self, body: bytes) -> str:
        """The human message inside one of this dialect's error bodies."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return ""
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        return ""

    def plan(
        self,
        method: bytes,
        api_path: str,
        read: ReadBody,
        model: str | None,
        inject_usage: frozenset[str],
    ) -> RequestPlan:
        return plan_request(self.name, method, api_path, read, model, inject_usage)

    def meter(
        self,
        plan: RequestPlan,
        api_path: str,
        status: int,
        content_type: bytes | None,
        content_encoding: bytes | None,
    ) -> Meter:
        return meter_for(plan, self.name, api_path, status, content_type, content_encoding)

    def answer_rewrite(self, api_path: str) -> Callable[[bytes], bytes] | None:
        """How a successful answer on ``api_path`` must be rewritten before
        the client sees it; the proxy then holds that answer whole (at most
        ``SCRUB_MAX``) instead of relaying it as it comes. None, for nearly
        every path: relayed unchanged."""
        return None

    def session_key(self, doc: dict | None) -> str | None:
        """An explicit conversation id in the body, if any."""
        return None

    def cache_prefix(self, doc: dict | None, size: int | None = None) -> bytes | None:
        """A digest of the prompt prefix the provider would cache, for prompts
        long enough (or marked) to be cached; None otherwise. ``size``: the
        request body's length, when known."""
        return None


class OpenAIDialect(Dialect):
    name = "openai"
    title = "OpenAI"

    _TYPES: ClassVar[dict[str, tuple[str, str | None]]] = {
        "invalid_request": ("invalid_request_error", None),
        "authentication": ("invalid_request_error", "invalid_api_key"),
        "permission": ("permission_error", "permission_denied"),
        "not_found": ("invalid_request_error", "not_found"),
        "timeout": ("invalid_request_error", "request_timeout"),
        "too_large": ("invalid_request_error", "request_too_large"),
        "rate_limited": ("requests", "rate_limit_exceeded"),
        "budget_exceeded": ("insufficient_quota", "budget_exceeded"),
        "upstream_unavailable": ("api_error", "upstream_unavailable"),
        "unavailable": ("api_error", "service_unavailable"),
        "upstream_timeout": ("api_error", "upstream_timeout"),
        "internal": ("api_error", "internal_error"),
    }

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        err_type, code = self._TYPES.get(kind, self._TYPES["internal"])
        return json.dumps(
            {"error": {"message": message, "type": err_type, "param": None, "code": code}},
            separators=(",", ":"),
        ).encode()

    def session_key(self, doc: dict | None) -> str | None:
        if doc is None:
            return None
        return _text(doc.get("prompt_cache_key")) or _text(doc.get("user"))

    def cache_prefix(self, doc: dict | None, size: int | None = None) -> bytes | None:
        if doc is None or (size is not None and size < _PREFIX_BYTES):
            # (a body shorter than the cacheable prefix cannot hold one: the
            # prompt's compact serialisation is never much longer than the
            # body it was parsed from)
            return None
        prompt = doc.get("messages")
        if prompt is None:
            prompt = doc.get("input")
        if prompt is None:
            return None
        # serialise piece by piece, only as far as the cacheable prefix goes
        pieces = [doc.get("instructions"), doc.get("tools")]
        pieces.extend(prompt if isinstance(prompt, list) else [prompt])
        out: list[str] = []
        written = 0
        for piece in pieces:
            written += _prefix_text(piece, _PREFIX_BYTES - written, out)
            if written >= _PREFIX_BYTES:
                break
        data = "".join(out).encode("utf-8", "surrogatepass")
        return _digest(data[:_PREFIX_BYTES]) if len(data) >= _PREFIX_BYTES else None


class AnthropicDialect(Dialect):
    name = "anthropic"
    title = "Anthropic"

    def answer_rewrite(self, api_path: str) -> Callable[[bytes], bytes] | None:
        # a message batch, a page of them, a cancelled one: each names its
        # results by an absolute URL on the provider (not the results, a
        # JSONL stream of any size, relayed as it comes)
        if _BATCH_ANSWERS.fullmatch(api_path) is None:
            return None
        return relative_results_urls

    _TYPES: ClassVar[dict[str, str]] = {
        "invalid_request": "invalid_request_error",
        "authentication": "authentication_error",
        "permission": "permission_error",
        "not_found": "not_found_error",
        "timeout": "timeout_error",
        "too_large": "request_too_large",
        "rate_limited": "rate_limit_error",
        "budget_exceeded": "rate_limit_error",
        "upstream_unavailable": "api_error",
        "unavailable": "overloaded_error",
        "upstream_timeout": "timeout_error",
        "internal": "api_error",
    }

    def error_body(self, kind: str, message: str, request_id: str | None = None) -> bytes:
        doc: dict = {
            "type": "error",
            "error": {"type": self._TYPES.get(kind, "api_error"), "message": message},
        }
        if request_id:
            doc["request_id"] = request_id
        return json.dumps(doc, separators=(",", ":")).encode()

    def session_key(self, doc: dict | None) -> str | None:
        if doc is None:
            return None
        metadata = doc.get("metadata")
        return _text(metadata.get("user_id")) if isinstance(metadata, dict) else None

    def cache_prefix(self, doc: dict | None, size: int | None = None) -> bytes | None:
        """Everything up to the first ``cache_control`` breakpoint, in the
        order Anthropic caches (tools, system, messages); None when the
        request marks none."""
        if doc is None:
            return None
        parts: list = []
        budget = [_BREAKPOINT_BLOCKS_MAX]
        for section in ("tools", "system", "messages"):
            value = doc.get(section)
            if value is None:
                continue
            blocks = value if isinstance(value, list) else [value]
            for block in blocks:
                parts.append(block)
                found = _has_breakpoint(block, budget)
                if found:
                    text = _PREFIX_ENCODER.encode(parts)
                    return _digest(text.encode("utf-8", "surrogatepass"))
                if found is None:
                    return None  # (none in the first blocks: no affinity, see below)
        return None


#: blocks looked at for a first cache_control breakpoint: a request that
#: marks none in its first thousands of blocks gets no prompt affinity (a
#: routing hint only), rather than a walk over millions of them on the
#: reactor
_BREAKPOINT_BLOCKS_MAX = 4096


def _has_breakpoint(block: object, budget: list[int], depth: int = 0) -> bool | None:
    """Whether ``block`` carries a ``cache_control`` breakpoint, in itself or
    in its content blocks; None once ``budget[0]`` blocks were looked at."""
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if depth > 4:
        return False
    if isinstance(block, dict):
        if "cache_control" in block:
            return True
        content = block.get("content")
        if isinstance(content, list):
            for b in content:
                found = _has_breakpoint(b, budget, depth + 1)
                if found is not False:
                    return found
    return False


OPENAI = OpenAIDialect()
ANTHROPIC = AnthropicDialect()
DIALECTS: dict[str, Dialect] = {d.name: d for d in (OPENAI, ANTHROPIC)}
