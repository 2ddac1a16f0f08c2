"""Request validation from the same JSON Schemas the OpenAPI document shows.

A small, strict subset of JSON Schema (2020-12, as OpenAPI 3.1 uses it):
``type`` (a name or a list), ``properties``, ``required``,
``additionalProperties: false``, ``minProperties``, ``maxProperties``, ``minLength``,
``maxLength``, ``pattern``, ``enum``, ``format`` (``uuid``, ``email``,
``date-time``), ``minimum``, ``maximum``, ``items``, ``minItems``,
``maxItems``, ``uniqueItems``. A schema using anything else is a programming
error, caught when the route is declared.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import islice
from typing import Any
from urllib.parse import unquote_to_bytes

from lectr.errors import BadRequest, LectrError

_KNOWN_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "enum",
        "format",
        "minimum",
        "maximum",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
        # annotations only
        "description",
        "default",
        "examples",
        "title",
        "writeOnly",
        "readOnly",
        "x-lectr-catalogue",  # where the OpenAPI document lists the provider catalogue
    }
)
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def check_schema(schema: dict, where: str = "schema") -> None:
    """Refuse keywords this validator does not implement (they would be
    silently ignored otherwise)."""
    unknown = set(schema) - _KNOWN_KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported JSON Schema keywords {sorted(unknown)}")
    for name, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{where}.{name}")
    if "items" in schema:
        # (each item is validated in Python: a 1 MiB list of them held the
        # reactor 0.6 s)
        if "maxItems" not in schema:
            raise ValueError(f"{where}: a list whose items are validated needs maxItems")
        check_schema(schema["items"], f"{where}[]")


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name in ("string", "object", "array", "null"):
        return isinstance(value, _TYPES[name])
    if name == "boolean":
        return isinstance(value, bool)
    raise ValueError(f"unknown type {name!r}")


def _describe(types: list[str]) -> str:
    names = {
        "object": "an object",
        "array": "a list",
        "string": "a string",
        "boolean": "true or false",
        "integer": "a whole number",
        "number": "a number",
        "null": "null",
    }
    return " or ".join(names[t] for t in types)


def _label(path: str) -> str:
    return path or "the body"


def validate(value: Any, schema: dict, path: str = "") -> None:
    """Raise BadRequest naming the first field that does not conform."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in types):
            raise BadRequest(f"{_label(path)} must be {_describe(types)}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        raise BadRequest(f"{_label(path)} must be one of {allowed}")
    if isinstance(value, dict):
        _validate_object(value, schema, path)
    elif isinstance(value, list):
        _validate_array(value, schema, path)
    elif isinstance(value, str):
        _validate_string(value, schema, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise BadRequest(f"{_label(path)} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise BadRequest(f"{_label(path)} must be at most {schema['maximum']}")


def _validate_object(value: dict, schema: dict, path: str) -> None:
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        for key in value:
            if key not in props:
                shown = key if len(key) <= 40 else key[:40] + "…"
                raise BadRequest(f"unknown field {shown!r}" + (f" in {path}" if path else ""))
    for key in schema.get("required", ()):
        if key not in value:
            raise BadRequest(f"{_join(path, key)} is required")
    if len(value) < schema.get("minProperties", 0):
        raise BadRequest(f"{_label(path)} must set at least {schema['minProperties']} field(s)")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise BadRequest(f"{_label(path)} must have at most {schema['maxProperties']} fields")
    for key, sub in props.items():
        if key in value:
            validate(value[key], sub, _join(path, key))


def _validate_array(value: list, schema: dict, path: str) -> None:
    if len(value) < schema.get("minItems", 0):
        raise BadRequest(f"{_label(path)} must have at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise BadRequest(f"{_label(path)} must have at most {schema['maxItems']} items")
    items = schema.get("items")
    if items is not None:
        for i, item in enumerate(value):
            validate(item, items, f"{_label(path)}[{i}]")
    if schema.get("uniqueItems"):
        seen = [json.dumps(v, sort_keys=True) for v in value]
        if len(set(seen)) != len(seen):
            raise BadRequest(f"{_label(path)} must not repeat items")


def _validate_string(value: str, schema: dict, path: str) -> None:
    if len(value) < schema.get("minLength", 0):
        if schema["minLength"] == 1:
            raise BadRequest(f"{_label(path)} must not be empty")
        raise BadRequest(f"{_label(path)} must be at least {schema['minLength']} characters long")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise BadRequest(f"{_label(path)} must be at most {schema['maxLength']} characters long")
    if "pattern" in schema and _pattern(schema["pattern"]).search(value) is None:
        raise BadRequest(f"{_label(path)} is malformed")
    fmt = schema.get("format")
    if fmt == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            raise BadRequest(f"{_label(path)} must be a UUID") from None
    elif fmt == "email":
        if not _EMAIL.fullmatch(value):
            raise BadRequest(f"{_label(path)} must be an email address")
    elif fmt == "date-time":
        parse_datetime(value, path)


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern:
    """A JSON Schema ``pattern`` (an ECMA-262 regex) as Python's ``re``
    compiles it, except for ``$``: in ECMA-262 (without the multiline flag)
    it matches only at the end of the input, in Python also before a final
    newline, which would let ``"5\\n"`` through ``^[0-9]+$``. Each ``$``
    outside a character class becomes ``\\Z``."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_datetime(value: str, what: str) -> datetime:
    """An ISO 8601 date or date-time; a value without a time zone is UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadRequest(
            f"{what} must be an ISO 8601 date or time, e.g. 2025-01-31T12:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # (a day's margin from datetime's own range: the windows and hours
    # computed from a date - a default 30-day range, the hour around it -
    # stay representable)
    try:
        in_range = _EARLIEST <= parsed.astimezone(UTC) <= _LATEST
    except OverflowError:
        in_range = False
    if not in_range:
        raise BadRequest(f"{what} must be between the years 2 and 9998")
    return parsed


_EARLIEST = datetime(2, 1, 1, tzinfo=UTC)
_LATEST = datetime(9998, 12, 31, 23, 59, 59, tzinfo=UTC)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


#: commas an admin body may hold at most (one per JSON value or member past
#: the first of each array or object, and any in its strings). Parsing is
#: the reactor's time, which the proxy shares: 1 MiB of small values (half
#: a million ``0``) cost a route explanation, which any member of an org may
#: ask for, 50-110 ms (the admin parse, then the body re-serialised and read
#: as the proxy reads it). The admin API's own documents stay far below the
#: cap (the largest, a provider's model lists, is 1,000 strings; a MiB of
#: prose holds 10,000-20,000); a route explanation of a request carrying
#: tens of thousands of numbers (pre-tokenised input) reaches it, and needs
#: only the model and the fields Lectr acts on anyway.
BODY_COMMAS_MAX = 50_000


class TooManyValues(LectrError):
    status = 413
    code = "too_many_values"


def parse_json_body(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, and every string (keys
    included) text (see :func:`require_text`); at most
    :data:`BODY_COMMAS_MAX` commas, counted in C before anything is parsed
    (TooManyValues, 413). Raises BadRequest."""
    if raw.count(b",") > BODY_COMMAS_MAX:
        raise TooManyValues(
            f"the request body holds more than {BODY_COMMAS_MAX} commas: "
            "the admin API takes smaller JSON documents"
        )
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
    _require_text_throughout(doc, text)
    return doc


# --- text: what every admin input must be -------------------------------------
#
# Every string the admin API accepts (JSON strings and object keys, the path,
# query names and values) must be text that UTF-8 and PostgreSQL can carry:
# no unpaired UTF-16 surrogate (JSON's "\ud800" escape decodes to one; UTF-8
# cannot encode it) and no NUL (PostgreSQL text cannot hold it). Anything
# else reaches a handler only to fail deep down (in the database driver, a
# log observer, an error message) as a 500. The request target is checked
# before routing (:class:`lectr.admin.api.TextGate`), bodies when they are
# parsed (:func:`parse_json_body`): two call sites of one rule, covering
# every route.

INVALID_TEXT = "invalid_text"


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text, or None when it is."""
    if "\x00" in value:
        return "it contains a NUL character (U+0000)"
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it contains an unpaired surrogate (U+{ord(value[e.start]):04X})"
    return None


def require_text(value: str, what: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise BadRequest(f"{what} is not valid text: {problem}", code=INVALID_TEXT)
    return value


#: a JSON escape of a UTF-16 surrogate pair (one character, as json decodes it)
_SURROGATE_PAIR_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
#: an escape of a NUL or of a surrogate (once the pairs are out of the way)
_NON_TEXT_ESCAPE = re.compile(r"\\u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
#: the values a refusal looks through to name the field that is not text
#: (past them, it names none)
TEXT_PATH_SEARCH_MAX = 20_000


def _non_text_escape(raw: str) -> re.Match | None:
    """The first escape in a JSON text (valid: ``json`` decoded it) that
    decodes to a NUL or to an unpaired surrogate, or None. Without one, no
    string of the document is anything but text: a NUL or a surrogate as it
    is in the text is refused by the JSON grammar or the strict UTF-8
    decoding. Three passes in C, whatever the shape of the document."""
    if "\\u" not in raw:
        return None
    # every remaining backslash starts an escape (json reads a run of them
    # in pairs from its start, as str.replace does), and a pair of
    # surrogates is one character; neither leaves a backslash or a hex digit
    # behind, so what is left cannot pair with its new neighbours
    escapes = raw.replace("\\\\", "__")
    escapes = _SURROGATE_PAIR_ESCAPE.sub("__", escapes)
    return _NON_TEXT_ESCAPE.search(escapes)


def _require_text_throughout(doc: Any, raw: str) -> None:
    """Every string of a document decoded from the JSON text ``raw``, keys
    included, is text (:func:`require_text`).

    Decided on the text (:func:`_non_text_escape`); the document is looked
    through only to name the field in a refusal, and only so far
    (TEXT_PATH_SEARCH_MAX values): a walk of every value, with its path
    built for each (the path of a value 300 levels deep is 300 names), held
    the reactor 5 s for 1 MiB, 0.5 s for a flat one."""
    found = _non_text_escape(raw)
    if found is None or _name_non_text(doc):
        return
    # (the value of a key that comes again, or past TEXT_PATH_SEARCH_MAX)
    code = int(found.group(1), 16)
    problem = (
        "it contains a NUL character (U+0000)"
        if code == 0
        else f"it contains an unpaired surrogate (U+{code:04X})"
    )
    raise BadRequest(f"a string in the body is not valid text: {problem}", code=INVALID_TEXT)


def _name_non_text(doc: Any) -> bool:
    """Raise BadRequest naming the first string of ``doc`` found not to be
    text, among its first TEXT_PATH_SEARCH_MAX values (iterative: nesting
    depth is bounded only by the body size; a value's path is built only
    to name it). True: every string of ``doc`` is text."""
    if type(doc) is str:
        require_text(doc, _label(""))
    if type(doc) is not dict and type(doc) is not list:
        return True
    budget = TEXT_PATH_SEARCH_MAX
    complete = True
    # a trail: None (the body) or (the parent's trail, a key or an index)
    stack: list[tuple[Any, Any]] = [(doc, None)]
    while stack and budget > 0:
        value, trail = stack.pop()
        n = min(len(value), budget)
        complete = complete and n == len(value)
        budget -= n
        is_dict = type(value) is dict
        # (a step: a key, or an index)
        steps = islice(value.items(), n) if is_dict else enumerate(islice(value, n))
        for step, item in steps:
            if is_dict and text_problem(step) is not None:
                require_text(step, f"a field name in {_label(_path(trail))}")
            kind = type(item)
            if kind is str:
                if text_problem(item) is not None:
                    require_text(item, _label(_path((trail, step))))
            elif kind is dict or kind is list:
                stack.append((item, (trail, step)))
    return complete and not stack


def _path(trail: Any) -> str:
    """The path of a value as :func:`validate` names fields (``a.b[0].c``,
    ``the body[2]``), from its trail (see :func:`_name_non_text`)."""
    steps = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    parts: list[str] = []
    for step in reversed(steps):
        if type(step) is int:
            parts.append(f"[{step}]" if parts else f"{_label('')}[{step}]")
        else:
            parts.append(("." if parts else "") + (step if len(step) <= 40 else step[:40] + "…"))
    return "".join(parts)


def _decode_component(raw: bytes, what: str, *, plus_is_space: bool = False) -> str:
    """Percent-decode one part of a URL and decode it as UTF-8, strictly
    (overlong forms, encoded surrogates and stray bytes are refused)."""
    if plus_is_space:
        raw = raw.replace(b"+", b" ")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"{what} is not valid text: its percent-encoded bytes are not UTF-8",
            code=INVALID_TEXT,
        ) from None
    return require_text(text, what)


def decode_path(uri: bytes) -> str:
    """The path of a request target, decoded; BadRequest if it is not text."""
    return _decode_component(uri.partition(b"?")[0], "the request path")


def decode_query(uri: bytes) -> dict[str, list[str]]:
    """The query string of a request target (``application/x-www-form-
    urlencoded``: ``+`` is a space), names and values decoded as text;
    BadRequest if any of them is not text."""
    query = uri.partition(b"?")[2]
    out: dict[str, list[str]] = {}
    if not query:
        return out
    for field in query.split(b"&"):
        if not field:
            continue
        raw_name, _, raw_value = field.partition(b"=")
        name = _decode_component(raw_name, "a query parameter name", plus_is_space=True)
        shown = name if len(name) <= 40 else name[:40] + "…"
        value = _decode_component(raw_value, f"query parameter {shown!r}", plus_is_space=True)
        out.setdefault(name, []).append(value)
    return out


# --- query strings ------------------------------------------------------------


@dataclass(frozen=True)
class QueryParam:
    """A query-string parameter: its JSON Schema (``integer``, ``string``,
    or ``string`` with ``format: date-time``). ``clamp``: an integer out of
    range is brought into range instead of refused (page sizes)."""

    name: str
    schema: dict
    description: str = ""
    clamp: bool = False

    def parse(self, text: str) -> Any:
        kind = self.schema.get("type")
        if kind == "integer":
            try:
                number = int(text.strip())
            except ValueError:
                raise BadRequest(f"{self.name} must be a whole number") from None
            if self.clamp:
                lo = self.schema.get("minimum", number)
                hi = self.schema.get("maximum", number)
                return max(lo, min(hi, number))
            validate(number, self.schema, self.name)
            return number
        validate(text, self.schema, self.name)
        if self.schema.get("format") == "date-time":
            return parse_datetime(text, self.name)
        return text


def parse_query(args: dict[str, list[str]], params: tuple[QueryParam, ...]) -> dict[str, Any]:
    """``args`` from :func:`decode_query`. Each declared parameter at most
    once; unknown parameters refused (a typo in a filter must not silently
    widen the result)."""
    by_name = {p.name: p for p in params}
    out: dict[str, Any] = {}
    for name, values in args.items():
        param = by_name.get(name)
        if param is None:
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise BadRequest(f"unknown query parameter {shown!r}")
        if len(values) != 1:
            raise BadRequest(f"{name} must be given once")
        out[name] = param.parse(values[0])
    for param in params:
        if param.name not in out and "default" in param.schema:
            out[param.name] = param.schema["default"]
    return out
