"""One strict reading of a request body: what Lectr judges is what the
provider reads.

The model policy (allow/block lists), routes, limits and pricing all act on
the model a request names. A gateway that reads the body differently from
the provider can be steered around its own policy (a duplicate ``"model"``
key that one parser keeps first and another last, a byte-order mark, JSON
behind whitespace a sniffer skipped, a form field past a parser's field
limit…). So the body is read once, strictly, and when Lectr cannot name the
one model with certainty it refuses the request (400) instead of forwarding
bytes it could not judge:

- at most one ``Content-Type`` header, and a well-formed media type;
- a body that is declared JSON, or that any lenient parser could take for
  JSON (its first significant byte, after every kind of whitespace and
  byte-order mark, is ``{`` or ``[``), must be strict JSON: UTF-8 without a
  byte-order mark (a UTF-8 BOM is removed: the bytes forwarded are the bytes
  judged), RFC 8259 syntax, a top-level object without duplicate keys and
  with at most ``JSON_MEMBERS_MAX`` members, a ``model`` that is a string
  of printable text, and the members Lectr acts on (``JUDGED_MEMBERS``) at
  most ``JUDGED_MEMBER_MAX`` characters of JSON each;
- ``multipart/form-data`` must parse strictly (CRLF lines, one boundary,
  ``form-data`` parts with a plain ``name``; at most ``MULTIPART_PARTS_MAX``
  parts and ``MULTIPART_HEADS_MAX`` bytes of part headers), with at most
  one ``model`` field;
- ``application/x-www-form-urlencoded`` must be ASCII, ``&``-separated
  (no ``;``), well-encoded, of a bounded number of fields, with at most one
  ``model`` field;
- anything else (audio, images, text) carries no model.

Duplicate keys are looked for at the top level of a JSON object, where every
member Lectr acts on lives (``model``, ``stream``, ``stream_options``,
``metadata``…); nested values are parsed by the C scanner at full speed.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.decoder import scanstring
from json.scanner import make_scanner
from types import MappingProxyType
from urllib.parse import unquote_to_bytes

#: model names longer than this are not model names
MODEL_MAX = 256
#: URL-encoded form fields read at most
FORM_FIELDS_MAX = 1000
#: multipart parts read at most
MULTIPART_PARTS_MAX = 1000
#: bytes of part headers a multipart body may carry, all parts together
#: (an SDK's are ~100 a part): each header line costs a turn of a Python
#: loop, and 15 MiB of them held the reactor 3.5 s
MULTIPART_HEADS_MAX = 64 * 1024
#: top-level members of a JSON body read at most: no provider's API takes
#: more than a few dozen, and each costs a turn of the Python loop below (a
#: 31 MiB body of 2.6 million of them held the reactor 4.6 s)
JSON_MEMBERS_MAX = 1000
#: JSON bodies larger than this are parsed with the cyclic garbage collector
#: paused: JSON makes no cycles, and its collections over millions of new
#: containers cost more than the parse (32 MiB of empty arrays: 4.2 s with
#: it, 1.6 s without)
JSON_GC_PAUSE_MIN = 1024 * 1024
# a body that is no JSON object is parsed only to say whether it is JSON at
# all, and only up to this size (it is refused either way)
_NOT_AN_OBJECT_PARSED_MAX = 64 * 1024

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
# Bytes some parser somewhere treats as leading whitespace (JSON's four, plus
# form feed, vertical tab, NUL and the BOM/NBSP bytes): used only to decide
# whether a body could be taken for JSON, never to accept one.
_SNIFF_SKIP = b" \t\r\n\f\v\x00\xef\xbb\xbf\xff\xfe\xc2\xa0"
_JSON_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = frozenset(" \t\n\r")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(
    rb"\s*(" + _TOKEN + rb")/(" + _TOKEN + rb")\s*"
    rb"((?:;\s*" + _TOKEN + rb"=(?:" + _TOKEN + rb'|"[^"\\\r\n]*(?:\\.[^"\\\r\n]*)*")\s*)*);?\s*',
)
_PARAM = re.compile(rb";\s*(" + _TOKEN + rb")=(" + _TOKEN + rb'|"[^"\\\r\n]*(?:\\.[^"\\\r\n]*)*")')
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_DISPOSITION_PARAM = re.compile(
    rb"\s*;\s*(" + _TOKEN + rb")\s*=\s*(" + _TOKEN + rb'|"[^"\\\r\n]*(?:\\.[^"\\\r\n]*)*")',
    re.IGNORECASE,
)

_DECODER = json.JSONDecoder()
_scan_value = make_scanner(_DECODER)


@dataclass(slots=True)
class BodyFacts:
    """What the policy reads deep inside a JSON body, computed where the
    body was parsed (see :attr:`ReadBody.facts`)."""

    output_limit: int | None
    """:func:`lectr.policy.limits.output_limit`"""
    completions: int
    """:func:`lectr.policy.limits.completions`"""
    session_key: str | None
    """the dialect's :meth:`~lectr.providers.dialects.Dialect.session_key`"""
    cache_prefix: bytes | None
    """the dialect's :meth:`~lectr.providers.dialects.Dialect.cache_prefix`"""


#: the longest JSON value (characters) a member of JUDGED_MEMBERS may have:
#: none is ever more than a few dozen, and a body judged in another process
#: sends these members back as values (lectr.proxy.judge)
JUDGED_MEMBER_MAX = 64 * 1024
#: the top-level members of a JSON body Lectr reads itself (the rest is read
#: through :class:`BodyFacts` when the body was judged in another process)
JUDGED_MEMBERS = frozenset(
    (
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
    )
)


class BodyRefused(ValueError):
    """The body cannot be judged with certainty (or is malformed for what it
    claims to be). The message is shown to the client."""


# Not frozen: one per request on the hot path (see lectr.usage.model.Usage);
# treat it as immutable all the same.
@dataclass(slots=True)
class ReadBody:
    kind: str
    """``empty``, ``json``, ``multipart``, ``form`` or ``opaque``."""
    doc: dict | None
    """The parsed top-level JSON object (``json`` bodies)."""
    model: str | None
    """The model the body names, if any."""
    body: bytes
    """The bytes to forward: the client's, minus a UTF-8 byte-order mark."""
    model_span: tuple[int, int] | None = None
    """Where the model's value is in ``body`` (the JSON value with its quotes,
    or a multipart field's bytes), so that a route replaces it without
    re-encoding the rest of the body."""
    options_span: tuple[int, int] | None = None
    """Where the top-level ``stream_options`` value is in ``body``, so that
    the usage request is spliced into it without re-encoding the rest."""
    facts: BodyFacts | None = None
    """What the policy reads from a body judged in another process
    (:mod:`lectr.proxy.judge`), whose ``doc`` then holds only the members
    Lectr acts on (:data:`JUDGED_MEMBERS`); None when ``doc`` is the whole
    document and the policy reads the facts from it."""

    @property
    def stream(self) -> bool:
        return self.doc is not None and self.doc.get("stream") is True


_NO_PARAMS: Mapping[bytes, bytes] = MappingProxyType({})
_MEDIA_TYPES: dict[bytes, tuple[bytes, Mapping[bytes, bytes]]] = {}
_MEDIA_TYPES_MAX = 256  # distinct values remembered
_MEDIA_TYPE_REMEMBERED_BYTES = 256  # longer values are parsed every time


def media_type(content_type: bytes | None) -> tuple[bytes, Mapping[bytes, bytes]]:
    """``(type/subtype lower-cased, {param: value})``; ``(b"", {})`` when
    absent. Raises :class:`BodyRefused` when malformed. Well-formed values
    are remembered (a few distinct ones make nearly all traffic); the
    parameters are read-only."""
    if content_type is None:
        return b"", _NO_PARAMS
    known = _MEDIA_TYPES.get(content_type)
    if known is not None:
        return known
    result = _parse_media_type(content_type)
    if len(content_type) <= _MEDIA_TYPE_REMEMBERED_BYTES:
        if len(_MEDIA_TYPES) >= _MEDIA_TYPES_MAX:
            _MEDIA_TYPES.clear()
        _MEDIA_TYPES[content_type] = result
    return result


def _parse_media_type(content_type: bytes) -> tuple[bytes, Mapping[bytes, bytes]]:
    if not content_type.strip():
        return b"", _NO_PARAMS
    m = _MEDIA_TYPE.fullmatch(content_type)
    if m is None:
        raise BodyRefused("the Content-Type header is malformed")
    params: dict[bytes, bytes] = {}
    for name, value in _PARAM.findall(m.group(3)):
        name = name.lower()
        if name in params:
            raise BodyRefused(f"the Content-Type header repeats its {name.decode()!r} parameter")
        if value[:1] == b'"':
            value = re.sub(rb"\\(.)", rb"\1", value[1:-1])
        params[name] = value
    return (m.group(1) + b"/" + m.group(2)).lower(), MappingProxyType(params)


def is_json_type(mtype: bytes) -> bool:
    return mtype == b"application/json" or (
        mtype.startswith(b"application/") and mtype.endswith(b"+json")
    )


def looks_like_json(body: bytes) -> bool:
    """Could some parser take this body for JSON?"""
    head = body[:4096].lstrip(_SNIFF_SKIP)
    if head[:1] in (b"{", b"["):
        return True
    # leading whitespace longer than the window: look further, still cheaply
    return not head and len(body) > 4096 and body.lstrip(_SNIFF_SKIP)[:1] in (b"{", b"[")


def read_body(content_types: list[bytes] | None, body: bytes) -> ReadBody:
    """Judge a request body. ``content_types``: every ``Content-Type`` header
    value the request carried (None or empty when none)."""
    if content_types and len(content_types) > 1:
        raise BodyRefused("the request carries more than one Content-Type header")
    mtype, params = media_type(content_types[0] if content_types else None)
    declared_json = is_json_type(mtype)
    if not body or (body.isspace() and not declared_json):
        return ReadBody("empty", None, None, body)
    if mtype == b"multipart/form-data":
        if looks_like_json(body):
            raise BodyRefused("the body is declared multipart/form-data but looks like JSON")
        model, span = multipart_model(params, body)
        return ReadBody("multipart", None, model, body, span)
    if declared_json or looks_like_json(body):
        if body.isspace():
            return ReadBody("empty", None, None, body)
        forwarded = body[3:] if body.startswith(_UTF8_BOM) else body
        doc, span, options = parse_json_spans(forwarded)
        return ReadBody("json", doc, model_of(doc), forwarded, span, options)
    if mtype == b"application/x-www-form-urlencoded":
        return ReadBody("form", None, form_model(body), body)
    return ReadBody("opaque", None, None, body)


def parses(content_types: list[bytes] | None, body: bytes) -> bool:
    """Whether :func:`read_body` would parse ``body`` (JSON, a multipart or
    URL-encoded form) rather than judge it on its type and first bytes
    alone (audio, images, a malformed type): the bodies worth reading away
    from the reactor when they are large (:mod:`lectr.proxy.judge`)."""
    if content_types and len(content_types) > 1:
        return False
    try:
        mtype, _ = media_type(content_types[0] if content_types else None)
    except BodyRefused:
        return False
    return mtype in _FORMS or is_json_type(mtype) or looks_like_json(body)


_FORMS = frozenset((b"multipart/form-data", b"application/x-www-form-urlencoded"))


def parse_json_object(body: bytes) -> dict:
    """A strict JSON object: UTF-8, RFC 8259, no duplicate top-level keys."""
    return parse_json(body)[0]


def parse_json(body: bytes) -> tuple[dict, tuple[int, int] | None]:
    """:func:`parse_json_object`, and where the top-level ``model`` value is
    in ``body`` (byte offsets), so that a route can replace it in place."""
    doc, span, _ = parse_json_spans(body)
    return doc, span


_Span = tuple[int, int] | None


def parse_json_spans(body: bytes) -> tuple[dict, _Span, _Span]:
    """:func:`parse_json`, and where the top-level ``stream_options`` value
    is (byte offsets)."""
    if body.startswith(_OTHER_BOMS) or body.startswith(_UTF8_BOM):
        raise BodyRefused("the JSON body must be UTF-8 without a byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyRefused("the JSON body is not valid UTF-8") from None
    ws = _JSON_WS.match
    idx = ws(text, 0).end()
    if text[idx : idx + 1] != "{":
        if len(text) <= _NOT_AN_OBJECT_PARSED_MAX:  # (which of the two, for the message)
            try:
                json.loads(text)
            except (ValueError, RecursionError):
                raise BodyRefused("the request body is not valid JSON") from None
        raise BodyRefused("the request body must be a JSON object")
    if len(text) < JSON_GC_PAUSE_MIN or not gc.isenabled():
        return _parse_object(text, idx, body)
    gc.disable()
    try:
        return _parse_object(text, idx, body)
    finally:
        gc.enable()


def _parse_object(text: str, idx: int, body: bytes) -> tuple[dict, _Span, _Span]:
    """:func:`parse_json_spans` of ``text``, the body decoded, whose object
    opens at ``idx``."""
    ws = _JSON_WS.match
    doc: dict = {}
    span: _Span = None
    options: _Span = None
    # (whitespace is skipped with the regex only where there is some: compact
    # JSON, what SDKs send, has none between tokens)
    try:
        idx = ws(text, idx + 1).end()
        if text[idx : idx + 1] == "}":
            idx += 1
        else:
            while True:
                if text[idx : idx + 1] != '"':
                    raise ValueError
                key, idx = scanstring(text, idx + 1, True)
                if text[idx : idx + 1] != ":":
                    idx = ws(text, idx).end()
                    if text[idx : idx + 1] != ":":
                        raise ValueError
                idx += 1
                if text[idx : idx + 1] in _WS_CHARS:
                    idx = ws(text, idx).end()
                start = idx
                value, idx = _scan_value(text, idx)
                if key in doc:
                    raise BodyRefused(f"the JSON body repeats the key {_shown(key)!r}")
                if idx - start > JUDGED_MEMBER_MAX and key in JUDGED_MEMBERS:
                    raise BodyRefused(
                        f"the JSON body's {key!r} value is longer than "
                        f"{JUDGED_MEMBER_MAX} characters"
                    )
                doc[key] = value
                if len(doc) > JSON_MEMBERS_MAX:
                    raise BodyRefused(
                        f"the JSON body has more than {JSON_MEMBERS_MAX} top-level members"
                    )
                if key == "model":
                    span = (start, idx)
                elif key == "stream_options":
                    options = (start, idx)
                c = text[idx : idx + 1]
                if c in _WS_CHARS:
                    idx = ws(text, idx).end()
                    c = text[idx : idx + 1]
                if c == ",":
                    idx += 1
                    if text[idx : idx + 1] in _WS_CHARS:
                        idx = ws(text, idx).end()
                    continue
                if c == "}":
                    idx += 1
                    break
                raise ValueError
        if ws(text, idx).end() != len(text):
            raise ValueError
    except BodyRefused:
        raise
    except (ValueError, StopIteration, RecursionError, IndexError):
        raise BodyRefused("the request body is not valid JSON") from None
    if len(text) != len(body):  # not ASCII: offsets in bytes
        span = _in_bytes(text, span)
        options = _in_bytes(text, options)
    return doc, span, options


def _in_bytes(text: str, span: _Span) -> _Span:
    """A span of ``text`` as offsets in its UTF-8 encoding."""
    if span is None:
        return None
    start, end = span
    offset = len(text[:start].encode("utf-8"))
    return offset, offset + len(text[start:end].encode("utf-8"))


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def check_model(model: object) -> str:
    """A model name as every provider names its models: 1 to ``MODEL_MAX``
    characters of printable ASCII. Anything else (controls, lone or paired
    surrogates that parsers decode differently, look-alike letters) is not
    a model any provider serves, and is refused rather than judged."""
    if not isinstance(model, str):
        raise BodyRefused("'model' must be a string")
    if not 1 <= len(model) <= MODEL_MAX:
        raise BodyRefused(f"'model' must be 1 to {MODEL_MAX} characters long")
    if not (model.isascii() and model.isprintable()):
        raise BodyRefused("'model' must be printable ASCII")
    return model


def model_of(doc: dict) -> str | None:
    model = doc.get("model")
    return None if model is None and "model" not in doc else check_model(model)


def form_model(body: bytes) -> str | None:
    """The ``model`` field of a URL-encoded form, read strictly. Linear and
    in C over the body (read by index: no field copied, a long name never
    decoded, a long model value refused undecoded): decoding 32 MiB of
    ``%XX`` in one name held the reactor 20 s."""
    if b";" in body:
        raise BodyRefused("form bodies must separate fields with '&' only")
    if not body.isascii():
        raise BodyRefused("form bodies must be ASCII (percent-encode the rest)")
    if body.count(b"&") >= FORM_FIELDS_MAX:
        raise BodyRefused(f"form bodies may carry at most {FORM_FIELDS_MAX} fields")
    # every escape checked at once; when one is malformed, each field is
    # checked in turn below, so the first fault in the body is the one named
    # ('&' and '=' are no hex digits: a field's escapes are the body's)
    escapes_ok = not _bad_percent(body)
    model: str | None = None
    seen = False
    pos, size = 0, len(body)
    while pos < size:
        end = body.find(b"&", pos)
        if end < 0:
            end = size
        if end > pos:  # (an empty field is skipped)
            eq = body.find(b"=", pos, end)
            name_end, value_at = (end, end) if eq < 0 else (eq, eq + 1)
            if not escapes_ok and (
                _bad_percent(body[pos:name_end]) or _bad_percent(body[value_at:end])
            ):
                raise BodyRefused("the form body has a malformed percent-encoding")
            # (only a name of 5 to 15 bytes - each byte, or each %XX, one byte -
            # can decode to "model")
            if 5 <= name_end - pos <= 15 and _form_decode(body[pos:name_end]) == b"model":
                if seen:
                    raise BodyRefused("the form body repeats the 'model' field")
                seen = True
                if end - value_at > MODEL_MAX * 12:  # (a character: 4 UTF-8 bytes, as %XX)
                    raise BodyRefused(f"'model' must be 1 to {MODEL_MAX} characters long")
                try:
                    model = check_model(_form_decode(body[value_at:end]).decode("utf-8"))
                except UnicodeDecodeError:
                    raise BodyRefused("'model' must be UTF-8 text") from None
        pos = end + 1
    return model


#: every byte as '%', 'h' (a hex digit) or '.': a well-formed escape is "%hh"
_ESCAPE_MARKS = bytes(
    37 if c == 37 else 104 if c in b"0123456789ABCDEFabcdef" else 46 for c in range(256)
)


def _bad_percent(data: bytes) -> bool:
    """Whether a '%' in ``data`` is not followed by two hex digits: every
    '%' counted, then the well-formed escapes (no regex match per '%': 11
    million of them took 0.8 s)."""
    n = data.count(b"%")
    return n != 0 and data.translate(_ESCAPE_MARKS).count(b"%hh") != n


def _form_decode(data: bytes) -> bytes:
    return unquote_to_bytes(data.replace(b"+", b" "))


def multipart_model(
    params: Mapping[bytes, bytes], body: bytes
) -> tuple[str | None, tuple[int, int] | None]:
    """The ``model`` field of a multipart/form-data body (RFC 7578), read
    strictly and without copying the file parts, and where its value is."""
    boundary = params.get(b"boundary")
    if boundary is None or _BOUNDARY.fullmatch(boundary) is None:
        raise BodyRefused("multipart bodies need a valid boundary parameter")
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise BodyRefused("the multipart body must start with its boundary")
    separator = b"\r\n" + delimiter
    pos = len(delimiter)
    model: str | None = None
    span: tuple[int, int] | None = None
    heads = MULTIPART_HEADS_MAX  # (part header bytes still allowed)
    for _ in range(MULTIPART_PARTS_MAX + 1):
        tail = body[pos : pos + 2]
        if tail == b"--":
            return model, span  # the closing delimiter (an epilogue may follow)
        if tail != b"\r\n":
            raise BodyRefused("the multipart body is malformed after a boundary")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + heads + 4)
        if head_end < 0:
            if len(body) - pos - 2 > heads + 4:
                raise BodyRefused(
                    f"the multipart body's part headers exceed {MULTIPART_HEADS_MAX} bytes"
                )
            raise BodyRefused("a multipart part has no end of headers")
        heads -= head_end - pos - 2
        name = _part_name(body[pos + 2 : head_end])
        value_start = head_end + 4
        next_pos = body.find(separator, value_start)
        if next_pos < 0:
            raise BodyRefused("the multipart body has no closing boundary")
        if name == "model":
            if span is not None:
                raise BodyRefused("the multipart body repeats the 'model' field")
            span = (value_start, next_pos)
            value = body[value_start:next_pos]
            if len(value) > MODEL_MAX * 4:
                raise BodyRefused(f"'model' must be 1 to {MODEL_MAX} characters long")
            try:
                model = check_model(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise BodyRefused("'model' must be UTF-8 text") from None
        pos = next_pos + len(separator)
    raise BodyRefused(f"multipart bodies may carry at most {MULTIPART_PARTS_MAX} parts")


def _part_name(headers: bytes) -> str | None:
    """The ``name`` of a part from its header block (None for a part
    without one). Anything a lenient parser could read differently is
    refused."""
    name: str | None = None
    disposition_seen = False
    for line in headers.split(b"\r\n"):
        if b"\n" in line or b"\r" in line or line[:1] in (b" ", b"\t"):
            raise BodyRefused("a multipart part has malformed headers")
        field, colon, value = line.partition(b":")
        if not colon or not re.fullmatch(_TOKEN, field):
            raise BodyRefused("a multipart part has malformed headers")
        field = field.lower()
        if field == b"content-transfer-encoding":
            raise BodyRefused("multipart parts must not use Content-Transfer-Encoding")
        if field != b"content-disposition":
            continue
        if disposition_seen:
            raise BodyRefused("a multipart part repeats Content-Disposition")
        disposition_seen = True
        value = value.strip()
        if value[:9].lower() != b"form-data":
            raise BodyRefused("multipart parts must be 'form-data'")
        found: dict[bytes, bytes] = {}
        rest = value[9:]
        at = 0
        while at < len(rest):
            p = _DISPOSITION_PARAM.match(rest, at)
            if p is None:
                raise BodyRefused("a multipart part has a malformed Content-Disposition")
            key = p.group(1).lower()
            if key in found or key.endswith(b"*"):
                raise BodyRefused("a multipart part has an ambiguous Content-Disposition")
            raw = p.group(2)
            found[key] = re.sub(rb"\\(.)", rb"\1", raw[1:-1]) if raw[:1] == b'"' else raw
            at = p.end()
        if b"name" in found and b"filename" in found and found[b"name"] == b"model":
            raise BodyRefused("the 'model' field of a multipart body must not be a file")
        if b"name" in found:
            try:
                name = found[b"name"].decode("utf-8")
            except UnicodeDecodeError:
                raise BodyRefused("a multipart field name is not UTF-8") from None
    return name
