"""Token accounting on the wire: what a request asks for, and what its
response reports as usage, read from the bytes as they pass through.

Two entry points, both called by the proxy on the reactor thread:

- :func:`plan_request` looks at a request body once (model, stream) and, for
  OpenAI chat streams that did not ask for usage, makes the upstream request
  ask for it (``stream_options.include_usage``), so that Lectr gets exact
  counts on every stream.
- :func:`meter_for` picks the :class:`~lectr.usage.model.Meter` for a
  response when its headers arrive. A meter sees every body chunk
  (``feed``), returns the bytes to forward, and reports the usage seen so
  far (``finish``), also after a client disconnect.

Meters never buffer a whole stream: SSE meters keep the current partial
line (bounded) and a few counters; the JSON meter keeps a bounded copy of
the body (the head of a small body, the tail of a large one) and never
delays a byte. A meter that meets something it does not understand gives
up quietly (usage ``none``) and keeps forwarding: accounting must never
break a response. Both functions are pure and thread-safe.

See docs/usage-accounting.md for what is counted and where the numbers come
from.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import deque
from dataclasses import dataclass, replace
from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii

from twisted.logger import Logger

from lectr.providers.body import BodyRefused, ReadBody
from lectr.usage.model import NO_USAGE, RAW_USAGE_MAX, Meter, Usage, service_tier_of
from lectr.usage.stream_usage import CHAT_STREAM_USAGE

_log = Logger()

#: the member Lectr adds to an OpenAI chat stream request
INCLUDE_USAGE_MEMBER = b'"stream_options":{"include_usage":true},'

# --- bounds ---------------------------------------------------------------------

#: a non-streaming body up to this size is parsed whole; larger bodies are
#: searched for their top-level ``usage`` object in a bounded tail window
JSON_FULL_PARSE_MAX = 256 * 1024
#: the tail kept of a larger body
JSON_TAIL_BYTES = 256 * 1024
#: an SSE line (or event) longer than this is not kept whole: its head and a
#: tail window are, which is where a ``usage`` object lives
SSE_LINE_MAX = 1024 * 1024
SSE_TAIL_BYTES = 64 * 1024
#: a usage-only chunk is small: an event held back longer than this is not one
STRIP_HOLD_MAX = 64 * 1024
#: the start of an SSE event kept whole for the fast path until its end comes
#: (longer ones are assembled line by line)
CARRY_MAX = 16 * 1024
#: an OpenAI stream's events wait, uncounted, until this many bytes have
#: passed (see OpenAIStreamMeter._feed_events). Every open stream holds up
#: to this much, so it is small: per chunk 2.79 µs counted one by one, 2.10
#: with 512 bytes, 1.98 with 1 KiB, 1.92 with 2 KiB (bench/meter_bench.py);
#: per open idle stream at 10,000 (bench/run.py --only memory): 12.4 KiB
#: before the batch, 13.2 with 512 bytes, 14.1 with 1 KiB
DELTA_BATCH_BYTES = 512
#: decompressed bytes a meter will look at before giving up
DECODED_MAX = 256 * 1024 * 1024
#: a compressed read may decompress to this many times its size (at least
#: DECODE_STEP_MIN bytes); a read that holds more is a compression bomb, not
#: an answer (gzip text and SSE compress 5-30 times), and the meter gives up
#: rather than hold the reactor: 200 MiB from a 199 KiB gzip body held it
#: 285 ms in one read, 835 ms in all (a provider that ignores Lectr's
#: Accept-Encoding: identity is the only way such a body arrives)
DECODE_RATIO_MAX = 64
DECODE_STEP_MIN = 1024 * 1024
#: model names longer than this are not model names
MODEL_MAX = 256


# --- requests ---------------------------------------------------------------------


# Not frozen: one per request on the hot path (see lectr.usage.model.Usage);
# treat it as immutable all the same.
@dataclass(slots=True)
class RequestPlan:
    model: str | None
    """The request's model: the JSON body's ``model`` (a string), or the
    ``model`` field of a multipart/form-data body; None otherwise."""
    stream: bool
    """The JSON body asked for a stream (``"stream": true``)."""
    body: bytes
    """The bytes to send upstream: the client's bytes unless Lectr rewrote
    them."""
    strip_usage_chunk: bool
    """Lectr injected ``stream_options.include_usage``: remove the extra
    usage-only chunk from what the client receives."""


_MISSING = object()


def _media_type(content_type: bytes | None) -> bytes:
    if not content_type:
        return b""
    return content_type.split(b";", 1)[0].strip().lower()


def _is_json(media_type: bytes) -> bool:
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


def _norm_path(path: str) -> str:
    return path.rstrip("/") if len(path) > 1 else path


def plan_request(
    dialect: str,
    method: bytes,
    path: str,
    read: ReadBody,
    model: str | None = None,
    inject_usage: frozenset[str] = CHAT_STREAM_USAGE,
) -> RequestPlan:
    """Decide the bytes to send upstream for a body already judged by
    :func:`lectr.providers.body.read_body`.

    ``model``: the model to send when a route or a ``provider/model`` name
    chose another one than the body's (its value, or the multipart field,
    replaced in place). ``inject_usage``: the paths of the
    OpenAI-dialect streams that may be asked for their usage. Raises
    :class:`~lectr.providers.body.BodyRefused` when the model of a body that
    cannot be rewritten (a URL-encoded form) would have to change.
    """
    doc = read.doc
    stream = read.stream
    body = read.body
    rewrite = model is not None and model != read.model
    send_model = model if model is not None else read.model
    if doc is None:
        if rewrite:
            if read.model_span is None:
                raise BodyRefused("the model of this request cannot be rewritten")
            start, end = read.model_span
            body = _splice(body, [(start, end, send_model.encode("utf-8"))])
        return RequestPlan(send_model, False, body, False)
    inject = (
        stream
        and dialect == "openai"
        and method == b"POST"
        and _norm_path(path) in inject_usage
        and _asks_usage(doc) is False
    )
    if rewrite or inject:
        body = _spliced(read, send_model if rewrite else None, inject)
    return RequestPlan(send_model, stream, body, inject)


def _spliced(read: ReadBody, model: str | None, inject: bool) -> bytes:
    """A JSON body with its model replaced (``model``, when not None) and a
    final usage chunk asked for (``inject``), every other byte as the client
    sent it: the top-level ``model`` and ``stream_options`` values are
    replaced where they are (:attr:`ReadBody.model_span`,
    :attr:`ReadBody.options_span`), or spliced in as members right after the
    object's opening brace. (Never the whole body re-serialised: a large
    body's document may not even be here, see :mod:`lectr.proxy.judge`.)"""
    body = read.body
    if read.options_span is None and (model is None or read.model_span is not None):
        # the usual case, first (once per routed or metered stream): the
        # model replaced where it is, the usage member after the brace (the
        # object is not empty: it streams)
        view = _view(body)
        if model is None:
            brace = body.index(b"{") + 1
            return b"".join((view[:brace], INCLUDE_USAGE_MEMBER, view[brace:]))
        start, end = read.model_span
        value = _json_string(model)
        if not inject:
            return b"".join((view[:start], value, view[end:]))
        brace = body.index(b"{") + 1
        return b"".join((view[:brace], INCLUDE_USAGE_MEMBER, view[brace:start], value, view[end:]))
    edits: list[tuple[int, int, bytes]] = []
    members: list[bytes] = []
    if model is not None:
        if read.model_span is not None:
            edits.append((*read.model_span, _json_string(model)))
        else:
            members.append(b'"model":' + _json_string(model))
    if inject:
        if read.options_span is not None:
            options = read.doc.get("stream_options") if read.doc is not None else None
            asked = {**options, "include_usage": True} if isinstance(options, dict) else _ASKED
            try:
                edits.append((*read.options_span, _dumps(asked)))
            except RecursionError:  # (the parser took it on a shallower stack)
                raise BodyRefused("'stream_options' is nested too deeply") from None
        else:
            members.append(INCLUDE_USAGE_MEMBER[:-1])
    if members:
        # right after the brace, before any value replaced (read_body
        # forwards no byte-order mark and only JSON whitespace before it)
        brace = body.index(b"{") + 1
        after = _JSON_WS_BYTES.match(body, brace).end()
        if body[after : after + 1] != b"}":
            members.append(b"")  # not an empty object: a comma before the next member
        edits.append((brace, brace, b",".join(members)))
    if len(edits) > 1:
        edits.sort()
    return _splice(body, edits)


def _splice(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``body`` with each ``(start, end, data)`` of ``edits`` (in order, not
    overlapping) in place of its bytes ``start:end``, copied once (see
    :func:`_view`: a 15 MiB body spliced by concatenating slices of it was
    three copies, ~14 ms of the reactor)."""
    view = _view(body)
    pieces: list = []
    at = 0
    for start, end, data in edits:
        pieces.append(view[at:start])
        pieces.append(data)
        at = end
    pieces.append(view[at:])
    return b"".join(pieces)


def _view(body: bytes):
    """What to slice ``body`` through: a memoryview when it is large (its
    slices are not copies), the bytes themselves below 64 KiB (cheaper than
    making the view)."""
    return memoryview(body) if len(body) > 65536 else body


_ASKED = {"include_usage": True}
_JSON_WS_BYTES = re.compile(rb"[ \t\n\r]*")


def _dumps(doc) -> bytes:
    # ASCII output survives any lone surrogate the client's JSON escapes carried.
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _json_string(text: str) -> bytes:
    """``_dumps`` of a string, without building an encoder per call (json.dumps
    does when given separators): 0.13 µs instead of 0.93."""
    return encode_basestring_ascii(text).encode("ascii")


def _asks_usage(doc: dict) -> bool | None:
    """Whether an OpenAI chat stream already asks for usage: True, False, or
    None when ``stream_options`` is something the provider will refuse anyway
    (then the body goes up untouched)."""
    options = doc.get("stream_options", _MISSING)
    if options is _MISSING or options is None:
        return False
    if isinstance(options, dict):
        return options.get("include_usage") is True
    return None


# --- usage objects ----------------------------------------------------------------


def _count(value: object) -> int | None:
    """A token count as a provider reports it, or None."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


_RAW_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# The C encoder that _RAW_ENCODER.encode builds on every call, built once
# (a third of the cost of a stream's usage report). Without the cycle check:
# a usage object comes from json.loads, which cannot make a cycle.
_RAW_ENCODE = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _RAW_ENCODER.default, encode_basestring, None, ":", ",", False, False, True
    )
)


def _raw(usage: dict) -> str | None:
    """The provider's usage object as a row keeps it: compact JSON with the
    members, order and values received (bounded)."""
    try:
        if _RAW_ENCODE is not None:
            text = "".join(_RAW_ENCODE(usage, 0))
        else:
            text = _RAW_ENCODER.encode(usage)
    except (TypeError, ValueError, RecursionError):
        return None
    return text[:RAW_USAGE_MAX]


#: the tiers seen, by the text that named them (str, or its UTF-8 bytes):
#: service_tier_of's verdict on the few tiers providers name, remembered
_TIERS: dict[str | bytes, str] = {}
_TIERS_MAX = 64


def _tier_of(value: object) -> str | None:
    """:func:`~lectr.usage.model.service_tier_of` of a tier as read (a str,
    or the bytes of a JSON string's text with no escape), its verdict on a
    valid tier remembered (0.05 us instead of 0.2)."""
    kind = type(value)
    if kind is not str and kind is not bytes:
        return service_tier_of(value)
    tier = _TIERS.get(value)
    if tier is None:
        tier = service_tier_of(value if kind is str else value.decode("utf-8", "replace"))
        if tier is not None and len(_TIERS) < _TIERS_MAX:
            _TIERS[value] = tier
    return tier


def _model_name(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MODEL_MAX:
        return value
    return None


def _detail(usage: dict, names: tuple[str, ...], key: str) -> int | None:
    for name in names:
        details = usage.get(name)
        if isinstance(details, dict):
            value = _count(details.get(key))
            if value is not None:
                return value
    return None


def openai_usage(
    usage: object, model: object = None, raw: str | None = None, service_tier: object = None
) -> Usage | None:
    """Usage from an OpenAI ``usage`` object: chat and completions
    (``prompt_tokens``/``completion_tokens``), Responses and audio
    (``input_tokens``/``output_tokens``), embeddings (prompt and total).

    ``prompt_tokens`` already includes the cached tokens
    (``prompt_tokens_details.cached_tokens``; DeepSeek:
    ``prompt_cache_hit_tokens``). Reasoning tokens
    (``completion_tokens_details.reasoning_tokens``) are part of
    ``completion_tokens`` for OpenAI; some OpenAI-dialect providers (xAI)
    report them beside it, which shows as ``total = prompt + completion +
    reasoning``: then they are added to ``completion_tokens``, so that it is
    every output token billed. ``model`` is the response's model; ``raw``,
    the usage object's compact JSON as received, when the caller has it;
    ``service_tier``, the tier the answer names (its top-level
    ``service_tier``; Responses: the response's; or the UTF-8 text of that
    JSON string, with no escape), kept if
    :func:`~lectr.usage.model.service_tier_of` accepts it."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        completion = _count(usage.get("output_tokens"))
    total = _count(usage.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    reasoning = _detail(
        usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens"
    )
    if (
        reasoning
        and prompt is not None
        and completion is not None
        and total == prompt + completion + reasoning
    ):
        completion += reasoning  # reported beside the completion tokens, not inside
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    cached = _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
    if cached is None:
        cached = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    return Usage(
        prompt,
        completion,
        total,
        cached,
        None,
        "provider",
        reasoning,
        None,
        _tier_of(service_tier) if service_tier is not None else None,
        None,
        raw[:RAW_USAGE_MAX] if raw is not None else _raw(usage),
        _model_name(model),
    )


def anthropic_usage(usage: object, model: object = None) -> Usage | None:
    """Usage from an Anthropic ``usage`` object. Anthropic's
    ``input_tokens`` excludes the prompt tokens read from or written to the
    cache; Lectr's ``prompt_tokens`` is every prompt token (input + cache
    read + cache creation), so that ``cached_tokens`` is a part of it as it
    is for OpenAI. Cache writes are split by TTL when Anthropic says so
    (``cache_creation.ephemeral_5m_input_tokens`` and
    ``ephemeral_1h_input_tokens``); a plain ``cache_creation_input_tokens``
    is all 5-minute writes. ``output_tokens_details.thinking_tokens`` (the
    part of ``output_tokens`` spent reasoning) is ``reasoning_tokens``;
    ``service_tier`` (through :func:`~lectr.usage.model.service_tier_of`)
    and ``server_tool_use.web_search_requests`` are the tier and the web
    searches. ``model`` is the response's model."""
    if not isinstance(usage, dict):
        return None
    fields = _AnthropicCounts()
    if not fields.update(usage):
        return None
    return fields.usage("provider", model=_model_name(model))


class _AnthropicCounts:
    __slots__ = (
        "input",
        "output",
        "cache_read",
        "cache_creation",
        "cache_1h",
        "thinking",
        "tier",
        "searches",
        "raws",
    )

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_creation: int | None = None
        self.cache_1h: int | None = None
        self.thinking: int | None = None  # of output: reasoning
        self.tier: str | None = None  # usage.service_tier
        self.searches: int | None = None  # usage.server_tool_use.web_search_requests
        self.raws: list[str] = []  # the usage objects seen, in order

    def update(self, usage: dict) -> bool:
        """Take the counts present in ``usage`` (a later report wins; so do
        its service tier and web searches, which alone are no report)."""
        seen = False
        tier = usage.get("service_tier")
        if tier is not None:
            tier = _tier_of(tier)
            if tier is not None:
                self.tier = tier
        tools = usage.get("server_tool_use")
        if tools is not None and isinstance(tools, dict):
            searches = _count(tools.get("web_search_requests"))
            if searches is not None:
                self.searches = searches
        for attr, key in (
            ("input", "input_tokens"),
            ("output", "output_tokens"),
            ("cache_read", "cache_read_input_tokens"),
            ("cache_creation", "cache_creation_input_tokens"),
        ):
            value = _count(usage.get(key))
            if value is not None:
                setattr(self, attr, value)
                seen = True
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            five = _count(split.get("ephemeral_5m_input_tokens"))
            hour = _count(split.get("ephemeral_1h_input_tokens"))
            if five is not None or hour is not None:
                self.cache_1h = hour or 0
                if _count(usage.get("cache_creation_input_tokens")) is None:
                    self.cache_creation = (five or 0) + (hour or 0)
                seen = True
        details = usage.get("output_tokens_details")
        thinking = _count(details.get("thinking_tokens")) if isinstance(details, dict) else None
        if thinking is not None or _count(usage.get("output_tokens")) is not None:
            # (a breakdown of the output count it came with: a later output
            # count without one leaves it unknown)
            self.thinking = thinking
        if seen:
            raw = _raw(usage)
            if raw is not None:
                if len(self.raws) < 2:
                    self.raws.append(raw)
                else:  # keep the first report and the latest one
                    self.raws[1] = raw
        return seen

    def usage(self, source: str, output: int | None = None, model: str | None = None) -> Usage:
        completion = self.output if output is None else output
        prompt = None
        if self.input is not None:
            prompt = self.input + (self.cache_read or 0) + (self.cache_creation or 0)
        total = prompt + completion if prompt is not None and completion is not None else None
        cache_1h = self.cache_1h
        if cache_1h is not None and self.cache_creation is not None:
            cache_1h = min(cache_1h, self.cache_creation)
        thinking = self.thinking
        if output is not None and output != self.output:
            thinking = None  # an estimated output count: its breakdown is unknown
        elif thinking is not None and completion is not None:
            thinking = min(thinking, completion)
        raws = self.raws
        if not raws:
            raw = None
        elif len(raws) == 1:
            raw = raws[0]
        else:  # a stream: message_start's and message_delta's, in order
            raw = ("[" + ",".join(raws) + "]")[:RAW_USAGE_MAX]
        return Usage(
            prompt,
            completion,
            total,
            self.cache_read,
            self.cache_creation,
            source,
            thinking,
            cache_1h,
            self.tier,
            self.searches,
            raw,
            model,
        )


_USAGE_KEY_RE = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()


def _last_usage_key(data: bytes) -> re.Match | None:
    """The last ``"usage": {`` in ``data``: found by searching back for the
    key (memchr speed), the regular expression checked there; only when the
    last ``"usage"`` is not followed by an object are all the matches
    listed."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    m = _USAGE_KEY_RE.match(data, at)
    if m is not None:
        return m
    matches = list(_USAGE_KEY_RE.finditer(data, 0, at))
    return matches[-1] if matches else None


def _report_in_tail(tail: bytes, nested: bool = False) -> tuple[dict | None, object]:
    """The last ``"usage": {...}`` object in a window of raw JSON, and the
    service tier the answer names.

    Every response shape Lectr meters puts its top-level ``usage`` after the
    bulky content (choices, data, output, content), and JSON strings cannot
    contain an unescaped quote, so the last such key in the tail of a body is
    the top-level one.

    The tier (unchecked; None when there is none or it cannot be told) is the last
    ``service_tier`` member of the object that holds that usage object,
    after it (chat: where OpenAI writes it) or before it (Responses: where
    OpenAI writes it, with ``user`` and ``metadata`` after the usage). That
    object must end the tail (``nested``: be the last member of the object
    that ends it, a stream event's ``response``)."""
    matches = list(_USAGE_KEY_RE.finditer(tail))
    for m in reversed(matches):
        start = m.end() - 1
        try:
            text = tail[start:].decode("utf-8", "replace")
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value, _tail_tier(tail, m.start(), text, end, nested)
    return None, None


_JSON_WS_RE = re.compile(r"[ \t\n\r]*")
#: the ``"service_tier"`` keys before a usage object tried, from the last
#: (a key inside a string, its quote escaped, is skipped without a try)
_SIBLING_TRIES = 8


def _tail_tier(tail: bytes, key_at: int, text: str, end: int, nested: bool) -> object:
    """The tier of :func:`_report_in_tail`: ``text`` is the tail from the
    usage object's brace, ``end`` the end of that object in it, ``key_at``
    where its key begins in ``tail``."""
    after = _members_to_close(text, end)
    if after is None:
        return None
    members, close = after
    outside = text[close:]
    if nested:
        if _SCALAR_MEMBERS_TO_END_RE.fullmatch(outside.encode("utf-8")) is None:
            return None
    elif outside.strip(" \t\n\r"):
        return None  # not a member of the outermost object: cannot tell
    tier = members.get("service_tier", _MISSING)
    if (
        tier is _MISSING
        # (memchr for the key's underscore first: 3 us over 256 KiB, the key's search 16)
        and tail.find(b"_", 0, key_at) >= 0
        and tail.rfind(_TIER_KEY, 0, key_at) >= 0
    ):
        tier = _sibling_tier(tail[:key_at].decode("utf-8", "replace"))
    return None if tier is _MISSING else tier


def _members_to_close(text: str, pos: int) -> tuple[dict, int] | None:
    """The members that follow a member's value (at ``pos``) to the end of
    their object, and where its closing brace ends; None when the text
    there is not ``(, "key": value)* }``."""
    ws = _JSON_WS_RE.match
    members: dict = {}
    try:
        while True:
            pos = ws(text, pos).end()
            c = text[pos : pos + 1]
            if c == "}":
                return members, pos + 1
            if c != ",":
                return None
            pos = _member(text, ws(text, pos + 1).end(), members)
            if pos < 0:
                return None
    except (ValueError, RecursionError):
        return None


def _member(text: str, pos: int, members: dict) -> int:
    """Read the member whose key's opening quote is at ``pos`` into
    ``members``: where its value ends, or -1 when no member is there.
    Raises ValueError or RecursionError for what is no JSON."""
    if text[pos : pos + 1] != '"':
        return -1
    key, pos = _DECODER.raw_decode(text, pos)
    pos = _JSON_WS_RE.match(text, pos).end()
    if text[pos : pos + 1] != ":":
        return -1
    members[key], pos = _DECODER.raw_decode(text, _JSON_WS_RE.match(text, pos + 1).end())
    return pos


def _sibling_tier(before: str) -> object:
    """The value of the last ``service_tier`` member among those that come
    before a member whose key begins where ``before`` ends, in the same
    object; _MISSING when none is found. A candidate key (never preceded by
    a backslash: see :func:`_tier_key_before`) is that object's only if the
    members from it parse, whole, up to that key: from inside a nested
    value they would have to cross its closing bracket."""
    ws = _JSON_WS_RE.match
    goal = len(before)
    key = '"service_tier"'
    at = before.rfind(key)
    tries = _SIBLING_TRIES
    while at > 0 and tries:
        if before[at - 1] != "\\":
            tries -= 1
            members: dict = {}
            pos = at
            try:
                while pos < goal:
                    pos = _member(before, pos, members)
                    if pos < 0:
                        break  # (not a member)
                    pos = ws(before, pos).end()
                    if before[pos : pos + 1] != ",":
                        pos = -1  # (the object's last member, or no member)
                        break
                    pos = ws(before, pos + 1).end()
            except (ValueError, RecursionError):
                pass
            else:
                if pos == goal:
                    return members.get("service_tier", _MISSING)
        at = before.rfind(key, 0, at)
    return _MISSING


# JSON text with no whitespace and no escapes: as the compact encoder writes it
_COMPACT_PLAIN_RE = re.compile(r"[^\s\\]*")
# the same, written compactly with no escapes (what providers send): a few
# times faster, and what it matches the general pattern matches too. Group 1
# is the value of the last "service_tier" member (every one sets it: a key
# with no escape is spelled so), as written. The two kinds of member exclude
# each other (the lookahead): a member that either could match would let a
# failing match try both for each, 2^n ways for n such members - a provider's
# answer with 30 of them would hold the reactor for minutes
# (tests/test_meter_backtracking.py)
_COMPACT_SCALAR_MEMBERS_TO_END_RE = re.compile(
    rb'(?:,"service_tier":("[^"\\]*"|-?[0-9][0-9.eE+-]*|true|false|null)'
    rb'|,"(?!service_tier")[^"\\]*":(?:"[^"\\]*"|-?[0-9][0-9.eE+-]*|true|false|null))*\}'
)
# after a top-level member: only scalar members, then the object's end
_SCALAR_MEMBERS_TO_END_RE = re.compile(
    rb'(?:\s*,\s*"[^"\\]*(?:\\.[^"\\]*)*"\s*:\s*'
    rb'(?:"[^"\\]*(?:\\.[^"\\]*)*"|-?[0-9][0-9.eE+-]*|true|false|null))*\s*\}\s*'
)


#: the key of OpenAI's top-level service tier, as every provider spells it
_TIER_KEY = b'"service_tier"'
# a "service_tier" member whose key begins at the match (it is a key only if
# a colon follows) and its value: a string (group 1, escapes and all) or
# another scalar
_TIER_MEMBER_RE = re.compile(
    rb'"service_tier"\s*:\s*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|-?[0-9][0-9.eE+-]*|true|false|null)'
)


def _string_value(text: bytes | None) -> str | None:
    """The string a JSON string literal's text (between its quotes) spells;
    None for None (another scalar) or what is no string."""
    if text is None:
        return None  # a number, true, false, null: no tier
    try:
        return json.loads(b'"' + text + b'"') if b"\\" in text else text.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


#: underscores looked at one by one (memchr) before searching for the key
#: itself (a slower search, in an answer full of code)
_TIER_SCAN_HITS = 16


def _tier_key_before(body: bytes, end: int) -> bool:
    """Whether ``body[:end]`` has a ``"service_tier"`` key, at any depth.

    Found by its underscore: memchr passes over most answers at once (0.2 us
    for 10 KB, where a search for the whole key costs 4 us). A key's opening
    quote is never preceded by a backslash, and a string holding the key's
    text has its quotes escaped: only a key is found. (A key spelled with a
    ``\\u`` escape is not.)"""
    under = body.find(b"_", 8, end)
    hits = 0
    while under >= 0:
        key = under - 8
        if (
            body.startswith(_TIER_KEY, key)
            and body[key - 1] != 92  # (a backslash: the quote is a string's)
            and _TIER_MEMBER_RE.match(body, key) is not None
        ):
            return True
        hits += 1
        if hits == _TIER_SCAN_HITS:  # (code, full of underscores: search for the key)
            key = body.find(_TIER_KEY, key + 1, end)
            while key >= 0:
                if body[key - 1] != 92 and _TIER_MEMBER_RE.match(body, key) is not None:
                    return True
                key = body.find(_TIER_KEY, key + 1, end)
            return False
        under = body.find(b"_", under + 1, end)
    return False


def _top_level_report(
    body: bytes, tier: bool
) -> tuple[dict, str | None, str | None, object] | None:
    """``(usage, model, raw, service_tier)`` of a whole JSON answer without
    parsing all of it, or None when that cannot be told exactly (the caller
    then parses it). ``raw`` is the usage object's text as received when it
    is compact ASCII JSON with no escapes (what providers send), so that it
    needs no re-serialising; None otherwise.

    The usage object is the last ``"usage": {`` found from the end, and it is
    the top-level member only if what follows it is scalar members and the
    closing brace of the outermost object. The model is the first
    ``"model": "…"`` if nothing but scalar members precede it (no ``{`` past
    the opening one, no ``[``); a body that names no model has none.

    ``tier`` (OpenAI answers): the top-level ``service_tier`` is read too
    (its value unchecked: :func:`openai_usage` checks it). OpenAI writes it
    after the usage object, among those scalar members: the last one there
    is the answer's. When there is none there, the answer has none unless a
    ``"service_tier"`` key comes before the usage object: at any depth, that
    only a full parse can tell (None)."""
    if body[-1:] != b"}" and body.rstrip()[-1:] != b"}":
        return None
    tail = body[-JSON_TAIL_BYTES:] if len(body) > JSON_TAIL_BYTES else body
    m = _last_usage_key(tail)
    if m is None or tail[m.start() - 1 : m.start()] == b"\\":
        return None  # (none, or the end of a key with an escaped quote: parse it all)
    start = m.end() - 1
    try:
        text = tail[start:].decode("utf-8")
        usage, end = _DECODER.raw_decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    rest = text[end:].encode("utf-8")
    if not isinstance(usage, dict) or rest.find(b'"usage"') >= 0:
        return None
    members = _COMPACT_SCALAR_MEMBERS_TO_END_RE.fullmatch(rest)
    if members is not None:
        found = members.group(1)
        if found is None:
            found = _MISSING
        elif found[:1] == b'"':
            found = found[1:-1]  # (its text, with no escape: _tier_of reads it)
        else:
            found = None  # a number, true, false, null
    elif _SCALAR_MEMBERS_TO_END_RE.fullmatch(rest) is not None:
        found = _MISSING
        if tier:  # (spaced, or with escapes: the members read as a full parse reads them)
            after = _members_to_close(text, end)
            if after is None:
                return None
            found = after[0].get("service_tier", _MISSING)
    else:
        return None
    service_tier = None
    if tier:
        if found is not _MISSING:
            service_tier = found
        elif _tier_key_before(body, len(body) - len(tail) + m.start()):
            return None  # (a key before the usage, maybe nested: parse it all)
    raw = text[:end]
    if not (raw.isascii() and _COMPACT_PLAIN_RE.fullmatch(raw)):
        raw = None
    if body.find(b'"model"') < 0:  # (bytes.find: `in` costs twice as much on bytes)
        # no model - unless a key spells it with an escape
        return None if body.find(b"\\u") >= 0 else (usage, None, raw, service_tier)
    found = _MODEL_RE.search(body, 0, 4096)
    if found is None:
        return None
    at = found.start()
    if (
        body.count(b"{", 0, at) != 1
        or body.find(b"[", 0, at) >= 0
        or body[at - 1 : at] == b"\\"  # the end of a key with an escaped quote
    ):
        return None
    try:
        return usage, _model_name(found.group(1).decode("utf-8")), raw, service_tier
    except UnicodeDecodeError:
        return None


# --- meters -----------------------------------------------------------------------


class NoopMeter:
    """Forwards everything, counts nothing."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""

    def finish(self, complete: bool = True) -> Usage:
        return NO_USAGE


NOOP_METER = NoopMeter()


class _Decoder:
    """Decompresses a copy of a gzip/deflate body for a meter (the client
    still receives the bytes as they came), bounded in total output and in
    output per read (DECODE_RATIO_MAX)."""

    __slots__ = ("_z", "_out", "failed")

    def __init__(self) -> None:
        self._z = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
        self._out = 0
        self.failed = False

    def decode(self, data: bytes) -> bytes:
        if self.failed:
            return b""
        room = DECODED_MAX - self._out
        if room <= 0:  # zlib reads a max_length of 0 as "no limit"
            self.failed = True
            return b""
        step = max(DECODE_STEP_MIN, len(data) * DECODE_RATIO_MAX)
        try:
            plain = self._z.decompress(data, room if room < step else step)
        except zlib.error:
            self.failed = True
            return b""
        self._out += len(plain)
        if self._z.unconsumed_tail:  # more than DECODED_MAX, or a bomb: stop looking
            self.failed = True
        return plain


class _Base:
    """Shared plumbing: optional decompression, and giving up quietly on
    anything unexpected (the bytes still flow)."""

    def __init__(self, decoder: _Decoder | None) -> None:
        self._decoder = decoder
        self._broken = False

    def _give_up(self) -> None:
        if not self._broken:
            self._broken = True
            _log.failure("usage meter failed; this response is not metered")

    def flush(self) -> bytes:
        """What is still held back when the answer has ended: nothing, but
        for a stream that is being stripped (:meth:`SSEMeter.flush`)."""
        return b""


class JsonMeter(_Base):
    """A non-streaming JSON body: keep a bounded copy, read ``usage`` at the
    end. Never changes or delays a byte."""

    def __init__(self, kind: str, decoder: _Decoder | None = None) -> None:
        super().__init__(decoder)
        self._kind = kind  # "openai" | "anthropic"
        self._head: list[bytes] | None = []
        self._size = 0
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._result: Usage | None = None
        self._head_model: str | None = None  # of a body too large to parse whole
        self._head_size = 0  # (its head, kept: the text in it, for a cut answer's estimate)
        self._head_text = 0
        self._head_open = False  # the head ends inside a text string

    def feed(self, data: bytes) -> bytes:
        if self._broken or self._result is not None or not data:
            return data
        try:
            plain = self._decoder.decode(data) if self._decoder is not None else data
            self._keep(plain)
        except Exception:
            self._give_up()
        return data

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self._size += len(data)
        if self._head is not None:
            self._head.append(data)
            if self._size <= JSON_FULL_PARSE_MAX:
                return
            # too large to parse whole on the reactor: keep only a tail window
            # (the model comes before the bulky content)
            head = b"".join(self._head)
            self._head_model = _first_model(head[:4096])
            self._head_size = len(head)
            self._head_text, self._head_open = _text_scan(head)
            for part in self._head:
                self._tail.append(part)
                self._tail_size += len(part)
            self._head = None
        else:
            if len(data) > JSON_TAIL_BYTES:
                data = data[-JSON_TAIL_BYTES:]
            self._tail.append(data)
            self._tail_size += len(data)
        while self._tail and self._tail_size - len(self._tail[0]) >= JSON_TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def finish(self, complete: bool = True) -> Usage:
        """The answer's usage. ``complete``: the provider's answer ended as
        its framing said; False (it was cut: the provider or the client
        left) reads nothing from a window of it - a cut body's last closing
        brace may close a nested object (a tool's input may hold a
        ``"usage"`` the model wrote) - and estimates instead."""
        if self._result is None:
            self._result = NO_USAGE
            if not self._broken:
                try:
                    self._result = self._read(complete) or NO_USAGE
                except Exception:
                    self._give_up()
        return self._result

    def _read(self, complete: bool) -> Usage | None:
        if self._decoder is not None and self._decoder.failed:
            return None
        if self._head is not None:
            if not self._head:
                return None
            body = b"".join(self._head)
            openai = self._kind == "openai"
            found = _top_level_report(body, openai) if complete else None
            if found is not None:  # the common case, without parsing the whole answer
                usage, model, raw, tier = found
                if openai:
                    return openai_usage(usage, model, raw, tier)
                return anthropic_usage(usage, model)
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                return _cut_json(body)  # cut short, or not JSON after all
            if not isinstance(doc, dict):
                return None
            usage, model, tier = doc.get("usage"), doc.get("model"), doc.get("service_tier")
        else:
            tail = b"".join(self._tail)[-JSON_TAIL_BYTES:]
            usage, tier = _report_in_tail(tail) if complete else (None, None)
            model = self._head_model
            if usage is None:  # a large body without its usage: cut short
                after_head = self._size - self._head_size  # (the tail may overlap the head)
                if after_head <= len(tail):
                    after = tail[len(tail) - after_head :]
                    text = self._head_text + _text_after(after, self._head_open)
                else:  # what was dropped between them is counted as text, as what follows it
                    text = self._head_text + after_head - len(tail) + _text_after(tail, True)
                return Usage(completion_tokens=-(-text // 4), source="estimated", model=model)
        if self._kind == "anthropic":
            return anthropic_usage(usage, model)
        return openai_usage(usage, model, None, tier)


# Text a JSON answer carries (message content, tool arguments, thinking,
# reasoning): what a cut answer had delivered, for an estimate (a string the
# cut ended is counted up to the cut).
_JSON_TEXT_RE = re.compile(
    rb'"(?:content|text|arguments|refusal|thinking|partial_json|reasoning_content|reasoning)"'
    rb'\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)(?:"|\\?\Z)'
)
_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


def _first_model(data: bytes) -> str | None:
    m = _MODEL_RE.search(data)
    if m is None:
        return None
    try:
        return _model_name(m.group(1).decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _cut_json(body: bytes) -> Usage | None:
    """A 2xx JSON object that ends early (the connection was cut): the
    provider produced the answer, so the usage is estimated from the text it
    had delivered (about four bytes a token); prompt tokens stay unknown."""
    if body.lstrip()[:1] != b"{":
        return None  # not a JSON object at all: nothing to estimate from
    text = _text_bytes(body)
    return Usage(completion_tokens=-(-text // 4), source="estimated", model=_first_model(body))


def _text_bytes(body: bytes) -> int:
    """Bytes of answer text in raw JSON (see ``_JSON_TEXT_RE``)."""
    return _text_scan(body)[0]


def _text_scan(body: bytes) -> tuple[int, bool]:
    """Bytes of answer text in raw JSON (see ``_JSON_TEXT_RE``), and whether
    ``body`` ends inside a text string."""
    n, inside = 0, False
    for m in _JSON_TEXT_RE.finditer(body):
        n += m.end(1) - m.start(1)
        inside = m.end() == len(body) and body[m.end(1) : m.end()] != b'"'
    return n, inside


_STRING_REST_RE = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')


def _text_after(data: bytes, inside: bool) -> int:
    """Text bytes in ``data``, a later part of an answer; ``inside``: it
    begins inside a text string (text up to that string's closing quote)."""
    n = _STRING_REST_RE.match(data).end() if inside else 0
    return n + _text_bytes(data[n:])


_PASS, _PENDING, _DROPPING, _DONE = range(4)


# With include_usage, OpenAI also adds "usage": null to every other chunk;
# a client that did not ask for usage would not have seen that field.
_NULL_USAGE = (b',"usage":null', b', "usage": null')
#: the longest start of a null member a partial line may end with
_NULL_USAGE_KEEP = len(_NULL_USAGE[1]) - 1


def _strip_null_usage(data):
    """Every ``"usage":null`` member of one or more whole events (bytes or
    bytearray; inside a JSON string the quotes would be escaped, so only
    members match)."""
    out = data.replace(_NULL_USAGE[0], b"")
    if len(out) == len(data) and data.find(_NULL_USAGE[1]) >= 0:  # not compact JSON
        out = data.replace(_NULL_USAGE[1], b"")
    return out


def _usage_only(doc: dict) -> bool:
    """The chunk OpenAI adds for include_usage: no choices, a usage object."""
    return doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


def _openai_report(doc: dict) -> Usage | None:
    """The usage an OpenAI event reports: chat/completions (``usage``) or
    Responses (``response.usage``), with the event's model and service tier
    (``service_tier``; ``response.service_tier``)."""
    usage = openai_usage(doc.get("usage"), doc.get("model"), None, doc.get("service_tier"))
    if usage is None and isinstance(doc.get("response"), dict):
        response = doc["response"]
        usage = openai_usage(
            response.get("usage"), response.get("model"), None, response.get("service_tier")
        )
    return usage


def _event_tier(data: bytes) -> str | None:
    """The service tier an OpenAI stream event (its data) names among its
    first members, before any nested value and on its first line: where
    OpenAI writes it in every chat chunk. Only a top-level key is found
    there: a nested one comes after a ``{`` or ``[``, and a string's quotes
    are escaped. None when there is none, or it is no tier."""
    if data[:1] != b"{":
        return None
    return _head_tier(data, 0)


def _run_tier(run: bytes) -> tuple[bool, str | None]:
    """``(found, tier)``: whether a run of whole events (their SSE lines)
    holds an event whose data is a JSON object, and the tier the first such
    event names as :func:`_event_tier` reads it."""
    pos, n = 0, len(run)
    while pos < n:
        end = run.find(b"\n\n", pos)
        if end < 0:
            end = n
        line = pos
        while line < end:  # the event's first data line (past event, id, comment lines)
            nl = run.find(b"\n", line, end)
            line_end = end if nl < 0 else nl
            if run.startswith(b"data:", line) or (
                line_end - line == 4 and run.startswith(b"data", line)
            ):
                break
            line = line_end + 1
        if line < end:
            # (a bare "data" line is empty data: the line after it is no data)
            brace = line + 6 if run.startswith(b"data: ", line) else line + 5
            if run[brace - 1 : brace] != b"\n" and run[brace : brace + 1] == b"{":
                return True, _head_tier(run, brace)
        pos = end + 2  # (no data, or not an object: [DONE], text)
    return False, None


def _head_tier(data: bytes, brace: int) -> str | None:
    """The tier named by the last ``"service_tier"`` key of the object that
    opens at ``brace``, among its members before any nested value and on
    that line (a key's quote is never preceded by a backslash; a value is
    not followed by a colon); None if there is none, or no tier."""
    end = len(data)
    for stop in (b"{", b"[", b"\n"):
        at = data.find(stop, brace + 1, end)
        if at >= 0:
            end = at
    tier = None
    at = data.find(_TIER_KEY, brace, end)
    while at >= 0:
        if data[at - 1] != 92:  # (a backslash: the quote is a string's)
            m = _TIER_MEMBER_RE.match(data, at)
            if m is not None and m.end() <= end:
                tier = _tier_of(_string_value(m.group(1)))
        at = data.find(_TIER_KEY, at + 14, end)
    return tier


class SSEMeter(_Base):
    """Server-sent events: split lines as they pass (any chunking), collect
    each event's ``event`` name and ``data``, hand complete events to
    :meth:`_event`. Keeps only the partial line (bounded).

    With ``strip`` (OpenAI chat, Lectr asked for usage), the single
    usage-only chunk (``"choices": []`` with a ``usage`` object) is removed,
    with its terminating blank line, from what is forwarded, and so is the
    ``"usage": null`` member OpenAI then adds to every other chunk; every
    other byte is forwarded unchanged. Until that chunk has gone by, the lines of
    the current event are held back only until its first ``data`` line is
    complete (the decision point), so the client sees each event as soon as
    it is whole.
    """

    #: events split across reads are carried to the fast path (see
    #: _carry_start); False where that path reads them line by line anyway
    _CARRIES = True

    def __init__(self, strip: bool = False, decoder: _Decoder | None = None) -> None:
        super().__init__(decoder)
        # line assembly (metering)
        self._line = bytearray()
        self._line_over = False  # the partial line passed SSE_LINE_MAX
        self._line_tail = bytearray()
        # the current event
        self._event_name: bytes | None = None
        self._data: list[bytes] = []
        self._data_size = 0
        self._data_over = False
        self._data_tail: bytes | bytearray = b""  # (a bytearray once past SSE_LINE_MAX)
        # stripping
        self._state = _PENDING if strip else _DONE
        self._held = bytearray()
        self._stripped = False
        self._finished: Usage | None = None
        self._final: Usage | None = None  # the provider's final usage report
        self._fed = False  # a response body began
        self._model: str | None = None  # the response's model, once seen
        # the start of an event the fast path keeps until its end comes, and
        # whether it was held back from the client (see _carry_start)
        self._carry = b""
        self._carry_held = False

    # --- forwarding ---------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        self._fed = True
        if (
            self._decoder is None
            and not self._broken
            and (self._state == _DONE or self._state == _PENDING)
            and data.find(b"\r") < 0  # (bytes.find: `in` costs twice as much on bytes)
        ):
            if self._carry:
                return self._feed_carried(data)
            if (  # (self._clean(), inline: this is every read of most streams)
                not self._line
                and not self._line_over
                and not self._data
                and not self._data_over
                and self._event_name is None
                and not self._held
            ):
                if data.endswith(b"\n\n"):  # whole events only, the usual read
                    try:
                        return self._feed_events(data, len(data))
                    except Exception:
                        self._give_up()
                        self._state = _DONE
                        return data
                return self._feed_run(data)
            # An event the line machinery began (a long one, or one with a CR):
            # it finishes it, up to the first blank line; the events after
            # that take the fast path again.
            first = data.find(b"\n\n") + 2 if self._CARRIES else 0
            if 1 < first < len(data):
                head = self._feed_lines(data[:first])
                if (
                    not self._broken
                    and (self._state == _DONE or self._state == _PENDING)
                    and self._clean()
                ):
                    return head + self._feed_run(data[first:])
                return head + self._feed_lines(data[first:])
        elif self._carry:
            return self._spill() + self._feed_lines(data)
        return self._feed_lines(data)

    def _clean(self) -> bool:
        """At an event boundary with nothing pending in the line machinery."""
        return (
            not self._line
            and not self._line_over
            and not self._data
            and not self._data_over
            and self._event_name is None
            and not self._held
        )

    def _feed_run(self, data: bytes) -> bytes:
        """``data`` from an event boundary (nothing pending): its whole events
        the fast way; the start of an event after them is carried (see
        :meth:`_carry_start`)."""
        end = data.rfind(b"\n\n")
        if end < 0:
            return self._carry_start(data)
        whole = end + 2
        done = self._state == _DONE  # (forwarded unchanged: only metered)
        try:
            out = self._feed_events(data if whole == len(data) else data[:whole], whole)
        except Exception:
            self._give_up()
            self._state = _DONE
            return data
        if whole < len(data):
            tail = data[whole:]
            if (
                not self._broken
                and (self._state == _DONE or self._state == _PENDING)
                and self._clean()
            ):
                out += self._carry_start(tail)
            else:
                out += self._feed_lines(tail)
        return data if done else out

    def _carry_start(self, tail: bytes) -> bytes:
        """The start of an event whose end is still to come: kept as it is,
        so that once whole it takes the fast path (event boundaries fall
        anywhere in a read: a TLS record, a TCP segment, a front's buffer);
        held back from the client while a usage chunk may still be stripped
        - only while no line of it is whole: the line machinery decides on
        each line as it completes, and forwards what it may at once. One too
        long to keep goes through the line machinery."""
        held = self._state == _PENDING
        if len(tail) > CARRY_MAX or (held and tail.find(b"\n") >= 0) or not self._CARRIES:
            return self._feed_lines(tail)
        self._carry = tail
        self._carry_held = held
        return b"" if held else tail

    def _feed_carried(self, data: bytes) -> bytes:
        carry = self._carry
        held = self._carry_held
        joined = carry + data
        if joined.find(b"\n\n", len(carry) - 1) < 0:  # (the blank line may straddle)
            if len(joined) <= CARRY_MAX and not (held and data.find(b"\n") >= 0):
                self._carry = joined
                return b"" if held else data
            # too long to keep, or a line of it whole while it is held back:
            # the line machinery's
            self._carry = b""
            out = self._feed_lines(joined)
        else:
            self._carry = b""
            out = self._feed_run(joined)
        return out if held else data

    def _spill(self) -> bytes:
        """Hand a carried event start to the line machinery; what of it is
        to be forwarded now (nothing if it was forwarded when it came)."""
        carry, self._carry = self._carry, b""
        if not carry:
            return b""
        out = self._feed_lines(carry)
        return out if self._carry_held else b""

    def _feed_events(self, data: bytes, whole: int) -> bytes:
        """The fast path: ``data[:whole]`` is made of complete events and
        nothing is pending. Single-line ``data:`` events (nearly all of
        them) are handled here without assembling lines; anything else goes
        through the line machinery, which is at an event boundary too."""
        stripping = self._state == _PENDING
        out: list[bytes] | None = [] if stripping else None
        pos = 0
        while pos < whole:
            nxt = data.find(b"\n\n", pos, whole)
            if nxt < 0:
                # blank lines in a row ("\n\n\n": rfind's boundary overlaps
                # the one before): the rest goes through the line machinery
                whole = pos
                break
            block = data[pos:nxt]
            pos = nxt + 2
            if (
                not block.startswith(b"data:")
                or b"\n" in block
                or len(block) > SSE_LINE_MAX
                or self._state not in (_DONE, _PENDING)
            ):
                forwarded = self._feed_lines(block + b"\n\n")
                if out is not None:
                    out.append(forwarded)
                continue
            value = _field_value(block, 5)
            if self._state == _PENDING:
                if self._is_usage_only(block):
                    self._stripped = True
                    self._state = _DONE
                else:
                    out.append(_strip_null_usage(block) + b"\n\n")
            elif out is not None:
                out.append(block + b"\n\n")
            self._event(None, value)
        if whole < len(data):
            rest = self._feed_lines(data[whole:])
            if out is not None:
                out.append(rest)
        return b"".join(out) if out is not None else data

    def _feed_lines(self, data: bytes) -> bytes:
        if self._state == _DONE:
            if not self._broken:
                try:
                    if self._decoder is not None:
                        self._meter(self._decoder.decode(data))
                    else:
                        self._meter(data)
                except Exception:
                    self._give_up()
            return data
        held_before = bytes(self._held)
        try:
            return self._feed_stripping(data)
        except Exception:
            # forward everything not yet forwarded, exactly once
            self._give_up()
            self._state = _DONE
            self._held = bytearray()
            return held_before + data

    def _feed_stripping(self, data: bytes) -> bytes:
        out = bytearray()
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                rest = data[pos:]
                self._partial(rest)
                if self._state == _PENDING:
                    self._held += rest
                    if len(self._held) > STRIP_HOLD_MAX:
                        # too big to be the usage chunk: forwarded, its null
                        # member cut, but for what may begin one (the member
                        # sits at the line's end, still to come)
                        held = _strip_null_usage(self._held)
                        out += held[:-_NULL_USAGE_KEEP]
                        self._held = bytearray(held[-_NULL_USAGE_KEEP:])
                elif self._state != _DROPPING:
                    out += rest
                break
            raw = data[pos : nl + 1]
            line = self._complete(data[pos:nl])
            pos = nl + 1
            state = self._state
            if state == _PENDING:
                self._held += raw
                if not line:  # an event without data (a comment, a keep-alive)
                    out += self._held
                    self._held.clear()
                elif line.startswith(b"data:"):
                    if self._is_usage_only(line):
                        self._held.clear()
                        self._state = _DROPPING
                    else:
                        out += _strip_null_usage(self._held)
                        self._held.clear()
                        self._state = _PASS
                elif len(self._held) > STRIP_HOLD_MAX:
                    out += self._held
                    self._held.clear()
                    self._state = _PASS
            elif state == _DROPPING:
                if not line:
                    self._stripped = True
                    self._state = _DONE
                    out += data[pos:]
                    self._meter(data[pos:])
                    break
            else:  # _PASS
                out += raw
                if not line:
                    self._state = _PENDING
        return bytes(out)

    def flush(self) -> bytes:
        """The answer ended inside an event still held back (its ``data``
        line not whole yet, so not known not to be the usage chunk; e.g. a
        last ``data: [DONE]`` without its newline): forwarded now, its null
        usage member cut, unless its data line is the usage chunk."""
        out = self._spill()
        held = self._held
        if self._state != _PENDING or not held:
            return out
        self._held = bytearray()
        self._state = _DONE
        held = bytes(held)
        try:
            line = held.rpartition(b"\n")[2].rstrip(b"\r")
            if line.startswith(b"data:") and self._is_usage_only(line):
                self._stripped = True
                return out
            return out + _strip_null_usage(held)
        except Exception:
            self._give_up()  # (as in feed: the bytes still flow, as they came)
            return out + held

    @staticmethod
    def _is_usage_only(line: bytes) -> bool:
        if b'"usage":null' in line or b'"choices":[{' in line:
            return False  # the common case, decided without a regex
        if len(line) > STRIP_HOLD_MAX or _USAGE_KEY_RE.search(line) is None:
            return False  # (every other chunk has "usage": null, or no usage at all)
        try:
            doc = json.loads(_field_value(line, 5))
        except (ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and _usage_only(doc)

    # --- line assembly ------------------------------------------------------------

    def _meter(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._partial(data[pos:])
                return
            self._complete(data[pos:nl])
            pos = nl + 1

    def _partial(self, piece: bytes) -> None:
        # (the tail keeps one byte more than it hands on: a CR the line may
        # end with, before its LF, is not data)
        if self._line_over:
            self._line_tail += piece
            if len(self._line_tail) > 2 * SSE_TAIL_BYTES:
                del self._line_tail[: -SSE_TAIL_BYTES - 1]
            return
        self._line += piece
        if len(self._line) > SSE_LINE_MAX:
            self._line_over = True
            self._line_tail = self._line[-SSE_TAIL_BYTES - 1 :]
            del self._line[256:]  # the head says which field it is

    def _complete(self, end: bytes) -> bytes:
        """Finish the current line with ``end`` (the bytes before its \\n),
        account for it, and return it (without the line terminator)."""
        over = False
        if self._line_over:
            self._line_tail += end
            line = bytes(self._line)
            if self._line_tail.endswith(b"\r"):  # (CRLF: the CR ends the line)
                del self._line_tail[-1:]
            tail = bytes(self._line_tail[-SSE_TAIL_BYTES:])
            over = True
            self._line.clear()
            self._line_tail = bytearray()
            self._line_over = False
        elif self._line:
            self._line += end
            line = bytes(self._line)
            self._line.clear()
        else:
            line = end
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
        elif line.startswith(b"data"):
            if over:
                self._add_data(b"", truncated_tail=tail)
            elif line.startswith(b"data:") or line == b"data":
                self._add_data(_field_value(line, 5))
        elif line.startswith(b"event:"):
            self._event_name = _field_value(line, 6).strip()
        return line

    def _add_data(self, value: bytes, truncated_tail: bytes | None = None) -> None:
        if truncated_tail is not None:
            self._data_over = True
            self._data_tail = bytearray(truncated_tail)
            return
        self._data_size += len(value) + 1
        if self._data_over:
            # (appended in place and cut back now and then, as a partial
            # line's tail is: a copy of the window per line cost 64 KiB for
            # each short line of such an event)
            tail = self._data_tail
            tail += b"\n"
            tail += value
            if len(tail) > 2 * SSE_TAIL_BYTES:
                del tail[:-SSE_TAIL_BYTES]
        elif self._data_size > SSE_LINE_MAX:
            self._data_over = True
            self._data_tail = bytearray((b"\n".join(self._data) + b"\n" + value)[-SSE_TAIL_BYTES:])
            self._data.clear()
        else:
            self._data.append(value)

    def _dispatch(self) -> None:
        name, self._event_name = self._event_name, None
        if self._data_over:
            tail = bytes(self._data_tail[-SSE_TAIL_BYTES:])
            self._data_tail, self._data_over = b"", False
            self._data.clear()
            self._data_size = 0
            self._event_truncated(name, tail)
            return
        if not self._data:
            return
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self._data_size = 0
        self._event(name, data)

    # --- accounting (subclasses) --------------------------------------------------

    def _event(self, name: bytes | None, data: bytes) -> None:
        raise NotImplementedError

    def _event_truncated(self, name: bytes | None, tail: bytes) -> None:
        """An event too large to keep: only its tail is known."""

    def _estimate(self) -> Usage:
        return NO_USAGE

    def finish(self, complete: bool = True) -> Usage:
        if self._finished is None:
            self._finished = NO_USAGE
            if self._carry:  # (metered: forwarding is flush's)
                self._spill()
            if not self._broken:
                try:
                    if self._final is None:
                        # the stream ended mid-event: read what did arrive
                        if self._line and not self._line_over:
                            self._complete(b"")
                        self._dispatch()
                    if self._decoder is not None and self._decoder.failed:
                        self._finished = NO_USAGE
                    else:
                        usage = self._final or self._estimate()
                        if usage.model is None and self._model is not None:
                            usage = replace(usage, model=self._model)
                        self._finished = usage
                except Exception:
                    self._give_up()
        return self._finished


def _field_value(line: bytes, prefix_len: int) -> bytes:
    value = line[prefix_len:]
    return value[1:] if value[:1] == b" " else value


# Text that a chunk adds to the answer (OpenAI chat: one chunk is about one
# token), its reasoning included (DeepSeek, xAI, vLLM: "reasoning_content";
# OpenRouter, Groq: "reasoning"). Used only to estimate a stream that ended
# before its usage report.
_OPENAI_TEXT_DELTA_RE = re.compile(
    rb'"(?:content|arguments|refusal|reasoning_content|reasoning)"\s*:\s*"[^"]'
)
_RESPONSES_DELTA_RE = re.compile(rb'"type"\s*:\s*"response\.[a-z_.]*delta"')
# compact "refusal", "reasoning" or "reasoning_content" string members: rare
# (OpenAI streams have none), looked for once per run
_RARE_TEXT_RE = re.compile(rb'"re(?:fusal|asoning(?:_content)?)":"')
# legacy completions (/v1/completions): a chunk's choice carries its piece of
# the answer as a non-empty "text"
_COMPLETION_TEXT_RE = re.compile(rb'"text"\s*:\s*"[^"]')


def _count_texts(data: bytes) -> int:
    """Text pieces in a run of legacy completions events (a non-empty
    ``"text"``)."""
    return len(_COMPLETION_TEXT_RE.findall(data))


def _count_deltas(data: bytes) -> int:
    """Text deltas in a run of OpenAI events (``"content"``, ``"arguments"``,
    ``"refusal"``, ``"reasoning_content"`` or ``"reasoning"`` with a
    non-empty string; a ``response.*delta`` type),
    as the regexes count them in the JSON providers write: compact (what
    OpenAI sends) or spaced, one way throughout a stream - the first
    member's colon tells which. Compact JSON is counted with bytes.count and
    bytes.find, five C-speed passes when nothing unusual is there (long
    needles: with a short one beginning with a quote, the search stops at
    every quote of the JSON)."""
    # the first member's colon (a JSON writer's style shows there)
    brace = data.find(b"{")  # (past a comment or an event line the run may begin with)
    head = data.find(b":", brace + 1, brace + 160) if brace >= 0 else -1
    if head > 0 and (data[head - 1] != 34 or data[head + 1 : head + 2].isspace()):
        # spaced JSON (`"id": "x"` or `"id" : "x"`): the regexes count
        return len(_OPENAI_TEXT_DELTA_RE.findall(data)) + len(_RESPONSES_DELTA_RE.findall(data))
    n = data.count(b'"content":"')
    if n:
        n -= data.count(b'"content":""')  # empty strings are not text
    if data.find(b'"tool_calls"') >= 0:
        n += data.count(b'"arguments":"') - data.count(b'"arguments":""')
    if _RARE_TEXT_RE.search(data) is not None:  # (one pass for the three: as cheap as one find)
        n += (
            data.count(b'"refusal":"')
            - data.count(b'"refusal":""')
            + data.count(b'"reasoning_content":"')
            - data.count(b'"reasoning_content":""')
            + data.count(b'"reasoning":"')
            - data.count(b'"reasoning":""')
        )
    if data.find(b'"type":"response.') >= 0:
        n += len(_RESPONSES_DELTA_RE.findall(data))
    return n


class OpenAIStreamMeter(SSEMeter):
    """OpenAI streams: chat and completions (the final usage chunk),
    Responses (``response.completed``/``incomplete``/``failed`` carry
    ``response.usage``), audio transcriptions (``transcript.text.done``),
    images (``image_generation.completed``/``image_edit.completed``: a
    top-level ``usage``, after the final image).

    A stream cut before its usage report is estimated: completion tokens
    from the number of text deltas seen (``legacy``, /v1/completions: of
    non-empty ``text`` pieces; an image stream has none); prompt tokens stay
    unknown.

    The service tier is the report's (the chunk's top-level
    ``service_tier``; Responses: the response's); a report that names none,
    and an estimate, take the tier the stream's first JSON chunk names
    (:func:`_event_tier`: OpenAI names it in every chat chunk, among its
    first members). Only that chunk is looked at: the chunks after it cost
    nothing more."""

    def __init__(
        self, strip: bool = False, decoder: _Decoder | None = None, legacy: bool = False
    ) -> None:
        super().__init__(strip, decoder)
        # how a run of events is counted, and what a run without any lacks
        self._count, self._marker = (
            (_count_texts, b'"text"') if legacy else (_count_deltas, b"delta")
        )
        self._deltas = 0
        # whole events of the fast path, their deltas not yet counted
        self._uncounted: list[bytes] = []
        self._uncounted_size = 0
        self._tier: str | None = None  # the first JSON chunk's
        self._tier_open = True  # that chunk is still to come

    def _event(self, name: bytes | None, data: bytes) -> None:
        if self._tier_open and data[:1] == b"{":
            self._tier_open = False
            self._tier = _event_tier(data)
        if self._model is None and b'"model"' in data:
            self._model = _first_model(data)
        # (substring checks first: they are much cheaper than the regexes)
        if b'"usage"' in data and _USAGE_KEY_RE.search(data) is not None:
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                doc = None
            usage = _openai_report(doc) if isinstance(doc, dict) else None
            if usage is not None:
                self._report(usage)
                return
        if data.find(self._marker) >= 0:
            # (every text delta of the event: one per choice when there are several)
            self._deltas += self._count(data)

    def _report(self, usage: Usage) -> None:
        """Keep the provider's report; one that names no service tier takes
        the first JSON chunk's."""
        if usage.service_tier is None and self._tier is not None:
            usage = replace(usage, service_tier=self._tier)
        self._final = usage

    def _feed_events(self, data: bytes, whole: int) -> bytes:
        """Faster than the per-event loop for OpenAI streams: a run of
        complete events is scanned as a whole. Deltas are counted with
        bytes.count; only the lines that carry a usage object are parsed;
        with stripping, the usage-only event and the ``"usage":null``
        members are cut out of the run. Anything unusual (a usage object
        outside a ``data:`` line, huge lines) takes the per-event path."""
        if whole < len(data) or whole > SSE_LINE_MAX:
            return super()._feed_events(data, whole)
        if self._tier_open:  # (the stream's first JSON chunk may be in this run)
            if data.startswith(b"data: {"):
                # (the usual first run: it opens with the first JSON chunk)
                self._tier_open, self._tier = False, _head_tier(data, 6)
            else:
                found, tier = _run_tier(data)
                if found:
                    self._tier_open, self._tier = False, tier
        stripping = self._state == _PENDING
        if stripping and data.find(b'"usage":{') < 0:
            # The usual run while stripping: content chunks, each with the
            # compact ``"usage":null`` member Lectr's include_usage made
            # OpenAI add. Cut them first; if no ``"usage"`` is left, the run
            # holds no report and no usage-only event, and is done. (A run
            # with a compact report goes straight to the full path below:
            # it would cut them again.)
            out = data.replace(_NULL_USAGE[0], b"")
            if out.find(b'"usage"') < 0:
                self._run_seen(data, whole)
                return out
        cut: tuple[int, int] | None = None
        reports = []
        at = data.find(b'"usage"')
        if at >= 0 and data.startswith(b'"usage":null', at):
            # (every chunk but the last has one: past the first, the regex
            # skips the others in C - 5.4 -> 3.4 us for a run of 20 events)
            at = data.find(b'"usage"', at + 12)
        matches = _USAGE_KEY_RE.finditer(data, at) if at >= 0 else ()
        for m in matches:
            start = data.rfind(b"\n", 0, m.start()) + 1
            end = data.find(b"\n", m.end())
            line = data[start:end]
            if not line.startswith(b"data:") or data[end : end + 2] != b"\n\n":
                return super()._feed_events(data, whole)
            if start and data[start - 2 : start] != b"\n\n":
                # not the event's first line: if a data line came before it,
                # the event's data is not this line alone (SSE joins them)
                begin = data.rfind(b"\n\n", 0, start)
                begin = 0 if begin < 0 else begin + 2
                if data.startswith(b"data", begin) or data.find(b"\ndata", begin, start) >= 0:
                    return super()._feed_events(data, whole)
            try:
                doc = json.loads(_field_value(line, 5))
            except (ValueError, RecursionError):
                continue
            if not isinstance(doc, dict):
                continue
            if stripping and cut is None and _usage_only(doc):
                if start and data[start - 2 : start] != b"\n\n":
                    # the usage line does not start its event
                    return super()._feed_events(data, whole)
                cut = (start, end + 2)  # the whole event: one data line and its blank line
            reports.append(doc)
        for doc in reports:
            usage = _openai_report(doc)
            if usage is not None:
                self._report(usage)
        self._run_seen(data, whole)
        if not stripping:
            return data
        if cut is not None:
            self._stripped = True
            self._state = _DONE
            return _strip_null_usage(data[: cut[0]]) + data[cut[1] :]
        return _strip_null_usage(data)

    def _run_seen(self, data: bytes, whole: int) -> None:
        """The model and the text deltas of a run of whole events, once its
        usage reports (if any) have been read."""
        if self._model is None and data.find(b'"model"') >= 0:
            self._model = _first_model(data)
        if self._final is None:
            # Deltas matter only if the stream ends without a usage report
            # (the estimate): they are counted in batches of whole events, a
            # few scans per batch rather than per event, and not at all once
            # the report came.
            self._uncounted.append(data)
            self._uncounted_size += whole
            if self._uncounted_size > DELTA_BATCH_BYTES:
                self._count_uncounted()
        elif self._uncounted:  # the report came: what waited is not needed
            self._uncounted.clear()
            self._uncounted_size = 0

    def _event_truncated(self, name: bytes | None, tail: bytes) -> None:
        # a huge response.completed (a long answer, images), an image stream's
        # completed event (after the final image): usage is near its end
        usage, tier = _report_in_tail(tail, True)  # (Responses: the response's tier)
        usage = openai_usage(usage, None, None, tier)
        if usage is not None:
            self._report(usage)

    def _count_uncounted(self) -> None:
        uncounted = self._uncounted
        if uncounted:
            self._deltas += self._count(
                uncounted[0] if len(uncounted) == 1 else b"".join(uncounted)
            )
            uncounted.clear()
            self._uncounted_size = 0

    def _estimate(self) -> Usage:
        # The stream began, so the provider had the prompt: an estimate
        # (completion tokens from the deltas seen, the prompt left to the
        # pricing), never "nothing".
        if not self._fed:
            return NO_USAGE
        self._count_uncounted()
        return Usage(completion_tokens=self._deltas, source="estimated", service_tier=self._tier)


_ANTHROPIC_TEXT_RE = re.compile(
    rb'"(?:text|partial_json|thinking)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)


class AnthropicStreamMeter(SSEMeter):
    """Anthropic message streams: ``message_start`` carries the input and
    cache tokens, ``message_delta`` the (cumulative) output tokens and, in
    newer API versions, updated input and cache tokens.

    A stream cut before ``message_delta`` is estimated: prompt tokens as
    ``message_start`` reported them, completion tokens from the text seen
    (about four bytes per token)."""

    #: every event has an ``event:`` line, which the generic fast path hands
    #: to the line machinery anyway: an event split across reads is not
    #: carried for it (that would be copying for nothing)
    _CARRIES = False

    def __init__(self, decoder: _Decoder | None = None) -> None:
        super().__init__(False, decoder)
        self._counts = _AnthropicCounts()
        self._started = False
        self._text_bytes = 0

    def _event(self, name: bytes | None, data: bytes) -> None:
        if name == b"content_block_delta" or (name is None and b'"content_block_delta"' in data):
            for m in _ANTHROPIC_TEXT_RE.finditer(data):
                self._text_bytes += m.end(1) - m.start(1)
            return
        is_start = name == b"message_start" or (name is None and b'"message_start"' in data)
        is_delta = name == b"message_delta" or (name is None and b'"message_delta"' in data)
        if not (is_start or is_delta):
            return
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        if doc.get("type") == "message_start":
            message = doc.get("message")
            if not isinstance(message, dict):
                return
            if self._model is None:
                self._model = _model_name(message.get("model"))
            usage = message.get("usage")
            if isinstance(usage, dict) and self._counts.update(usage):
                self._started = True
        elif doc.get("type") == "message_delta":
            usage = doc.get("usage")
            if isinstance(usage, dict) and self._counts.update(usage):
                self._final = self._counts.usage("provider", model=self._model)

    def _estimate(self) -> Usage:
        # The stream began, so the provider had the prompt: an estimate,
        # never "nothing" (output from the text seen, at least what
        # message_start reported; the prompt as message_start reported it,
        # else left to the pricing).
        if not self._fed:
            return NO_USAGE
        guess = -(-self._text_bytes // 4)
        output = max(self._counts.output or 0, guess)
        return self._counts.usage("estimated", output=output, model=self._model)


# --- choosing a meter --------------------------------------------------------------

# Image answers (gpt-image-*) report token usage after the image data: a JSON
# answer as its last member, a stream (``stream: true``) in its last event,
# ``image_generation.completed`` / ``image_edit.completed``, after the final
# image's ``b64_json``. Their partial-image events carry a megabyte or more
# of base64 each: an event over SSE_LINE_MAX is not kept, its usage is read
# from the tail window (OpenAIStreamMeter._event_truncated), the same
# ``openai_usage`` mapping as the JSON answer's (input_tokens -> prompt,
# output_tokens -> completion). Image streams report usage unasked: they are
# never in a provider's ``stream_usage_paths`` (no include_usage). dall-e-*
# answers report none and are logged without counts.
_OPENAI_IMAGES = {"/v1/images/generations", "/v1/images/edits"}
_OPENAI_STREAMS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/audio/transcriptions",
    *_OPENAI_IMAGES,
}
_OPENAI_JSON = _OPENAI_STREAMS | {"/v1/embeddings", "/v1/audio/translations"}
_ANTHROPIC = {"/v1/messages"}


def meter_for(
    plan: RequestPlan,
    dialect: str,
    path: str,
    status: int,
    content_type: bytes | None,
    content_encoding: bytes | None = None,
) -> Meter:
    """The meter for a response, chosen when its headers arrive.

    ``content_encoding`` (the response's Content-Encoding, optional): gzip
    and deflate bodies are metered on a decompressed copy; any other coding
    is not metered (and a usage chunk Lectr asked for cannot be removed, so
    the proxy should ask for ``identity`` upstream when
    ``plan.strip_usage_chunk``).
    """
    if not 200 <= status < 300:
        return NOOP_METER
    path = _norm_path(path)
    if dialect == "openai":
        json_kind, streams = ("openai" if path in _OPENAI_JSON else None), path in _OPENAI_STREAMS
    elif dialect == "anthropic":
        json_kind, streams = ("anthropic" if path in _ANTHROPIC else None), path in _ANTHROPIC
    else:
        return NOOP_METER
    media_type = _media_type(content_type)
    coding = (content_encoding or b"").strip().lower()
    decoder = None
    if coding in (b"gzip", b"x-gzip", b"deflate"):
        decoder = _Decoder()
    elif coding not in (b"", b"identity"):
        return NOOP_METER
    if media_type == b"text/event-stream" and streams:
        if dialect == "anthropic":
            return AnthropicStreamMeter(decoder)
        return OpenAIStreamMeter(
            plan.strip_usage_chunk and decoder is None, decoder, path == "/v1/completions"
        )
    if json_kind is not None and _is_json(media_type):
        return JsonMeter(json_kind, decoder)
    return NOOP_METER
