"""No one admin request holds the reactor: the admin API shares the proxy's
only thread, so a body an org admin sends, or an answer it asks for, must
cost time that grows with its size, and little of it.

- Every string of a JSON body must be text (lectr/admin/validation.py
  ``parse_json_body``). The check walked every value and built the path of
  each (``a.b.c[7]``) as it went: 300 levels of 40-character keys above a
  list of half a million numbers was 5 s (51 s at 900 levels), a flat 1 MiB
  list 0.5 s. It is now decided on the JSON text (the escapes that decode
  to a NUL or an unpaired surrogate), and the document is looked through,
  so far only, to name the field of a refusal.
- A list a body schema validates item by item needs ``maxItems``:
  ``retry_on`` had none, and 1 MiB of ``"429"`` was validated in 0.6 s.
- A page of request logs or usage groups was copied by ``dataclasses.asdict``
  before it was serialised (25 µs a row).
- Parsing itself: 1 MiB of ``0,0,…`` (half a million values) cost a route
  explanation 50-110 ms of one turn (the admin parse, then the body
  re-serialised and read as the proxy reads it), and any member of an org may
  ask for one. A body holds at most ``BODY_COMMAS_MAX`` commas, counted in C
  before it is parsed (the tests of the walk above raise the cap: they are
  about the walk, at the scale it used to take).

The deadline (tests/support/deadline.py) only turns a hang into a
failure; nothing here is timed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.admin import app as admin_app
from lectr.admin import schemas as s
from lectr.admin import validation
from lectr.admin.validation import (
    BODY_COMMAS_MAX,
    INVALID_TEXT,
    TEXT_PATH_SEARCH_MAX,
    TooManyValues,
    check_schema,
    parse_json_body,
    text_problem,
    validate,
)
from lectr.errors import BadRequest
from lectr.managers.usage import RequestEntry, UsageTotal
from tests.support.deadline import deadline

MiB = 1 << 20


def _deep(depth: int, key: str, inner: str) -> str:
    return f'{{"{key}":' * depth + inner + "}" * depth


def _flat(item: str, room: int) -> str:
    return "[" + ",".join([item] * (room // (len(item) + 1))) + "]"


@pytest.fixture
def uncapped(monkeypatch):
    """Bodies of any number of values (the walk's tests: 1 MiB of them)."""
    monkeypatch.setattr(validation, "BODY_COMMAS_MAX", 1 << 30)


def _refusal(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as refused:
        parse_json_body(raw)
    assert refused.value.code == INVALID_TEXT
    return refused.value


# --- the text of a JSON body ------------------------------------------------------------


def test_a_deep_and_wide_body_is_checked_without_a_path_for_each_value(uncapped):
    """300 levels of 40-character keys above a list of 500,000 numbers and a
    non-ASCII escape (so that the text says nothing about the strings without
    a look at the escapes): 5 s before, a few milliseconds now."""
    head = _deep(300, "k" * 40, "@")
    room = MiB - len(head) - 16
    body = head.replace("@", _flat("0", room)[:-1] + ',"\\u00e9"]')
    assert len(body) <= MiB
    with deadline():
        doc = parse_json_body(body.encode())
    inner = doc
    for _ in range(300):
        inner = inner["k" * 40]
    assert inner[-1] == "é"


@pytest.mark.parametrize("item", ["0", "[]", "{}", '"\\u0041"', '"\\ud83d\\ude42"', "[[]]"])
def test_a_flat_body_of_many_values_is_not_walked(item, monkeypatch, uncapped):
    """Decided on the text: a body whose every string is text is not looked
    through at all, whatever its shape."""
    walked = []
    monkeypatch.setattr(validation, "_name_non_text", walked.append)
    with deadline():
        parse_json_body(_flat(item, MiB - 2).encode())
    assert walked == []


def test_naming_the_field_of_a_refusal_looks_through_a_bounded_number_of_values(
    monkeypatch, uncapped
):
    """The string that is not text comes last, after 300,000 strings: the
    refusal names no field rather than look through them all."""
    checked = []

    def counting(value):
        checked.append(1)
        return text_problem(value)

    monkeypatch.setattr(validation, "text_problem", counting)
    raw = ("[" + '"a",' * 300_000 + '"\\u0000"]').encode()
    with deadline():
        refused = _refusal(raw)
    assert refused.message == (
        "a string in the body is not valid text: it contains a NUL character (U+0000)"
    )
    assert len(checked) <= TEXT_PATH_SEARCH_MAX


def test_a_refusal_still_names_the_field_deep_down():
    raw = _deep(900, "k" * 50, '["ok", "\\ud800x"]').encode()
    with deadline():
        refused = _refusal(raw)
    path = ".".join(["k" * 40 + "…"] * 900) + "[1]"
    assert (
        refused.message == f"{path} is not valid text: it contains an unpaired surrogate (U+D800)"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'"\\u0000"', "the body is not valid text: it contains a NUL character (U+0000)"),
        (
            b'[1, ["\\udc00"]]',
            "the body[1][0] is not valid text: it contains an unpaired surrogate (U+DC00)",
        ),
        (
            b'{"a": [{"b": ["ok", "\\u0000"]}]}',
            "a[0].b[1] is not valid text: it contains a NUL character (U+0000)",
        ),
        (
            b'{"a": {"\\ud83d": 1}}',
            "a field name in a is not valid text: it contains an unpaired surrogate (U+D83D)",
        ),
        (
            b'{"\\udfff": 1}',
            "a field name in the body is not valid text: it contains an "
            "unpaired surrogate (U+DFFF)",
        ),
        (
            b'[{"' + b"x" * 50 + b'": "\\u0000"}]',
            "the body[0]." + "x" * 40 + "… is not valid text: it contains a NUL character (U+0000)",
        ),
    ],
)
def test_refusals_name_the_field_as_before(raw, message):
    assert _refusal(raw).message == message


# the escapes (and their neighbours) that decide whether a JSON string is text
PIECES = [
    "a", "é", "0", "d", "u", "\\\\", '\\"', "\\n", "\\/", "\\u0041", "\\u00e9",
    "\\u0000", "\\u0001", "\\ud800", "\\uD83D", "\\udbff", "\\udc00", "\\uDE42",
    "\\udfff", "\\ue000", "\\\\u0000", "\\\\ud800", "\\\\\\u0000",
]  # fmt: skip
strings = st.lists(st.sampled_from(PIECES), max_size=8).map(lambda p: '"' + "".join(p) + '"')
documents = st.recursive(
    strings | st.sampled_from(["0", "true", "null", "[]", "{}"]),
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda v: "[" + ",".join(v) + "]")
        | st.lists(st.tuples(strings, inner), max_size=4).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        )
    ),
    max_leaves=12,
)


def _first_problem(doc) -> bool:
    """Whether any string of ``doc``, keys included, is not text (a plain
    walk: the reference)."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if text_problem(value) is not None:
                return True
        elif isinstance(value, dict):
            if any(text_problem(k) is not None for k in value):
                return True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(documents)
@example('"\\ud800\\ud800\\udc00"')  # a high surrogate, then a pair
@example('"\\ud800\\udc00\\udc00"')  # a pair, then a low one
@example('"\\ud800\\ud800\\udc00\\udc00"')  # a pair between two halves
@example('"\\\\ud800\\udc00"')  # an escaped backslash, "ud800", a low surrogate
@example('"\\\\\\ud800\\udc00"')  # an escaped backslash, then a pair
@example('{"a": "\\u0000", "a": "ok"}')  # a key that comes again: its last value
def test_the_text_decides_as_a_walk_of_every_string_would(raw):
    """Generated JSON: refused (invalid_text) exactly when a decoded string
    or key is not text, and, when refused, for a field that is not."""
    doc = json.loads(raw)
    if _first_problem(doc):
        _refusal(raw.encode())
    else:
        assert parse_json_body(raw.encode()) == doc


# --- lists a schema validates item by item ------------------------------------------------


def test_retry_on_is_bounded_before_its_items_are_validated(uncapped):
    body = {"targets": [{"provider": "openai", "model": "m"}], "retry_on": ["429"] * 170_000}
    doc = parse_json_body(json.dumps(body).encode())
    with deadline(), pytest.raises(BadRequest) as refused:
        validate(doc, s.PUT_ROUTE)
    assert refused.value.message == "retry_on must have at most 16 items"
    # what clients send stays accepted, repeats included
    validate({**body, "retry_on": ["429", "5xx", "timeout", "connect", "429"]}, s.PUT_ROUTE)


def test_a_body_schema_with_a_list_validated_item_by_item_needs_max_items():
    with pytest.raises(ValueError, match="maxItems"):
        check_schema({"type": "object", "properties": {"x": {"type": "array", "items": {}}}})
    check_schema({"type": "array", "maxItems": 3, "items": {"type": "string"}})
    # every declared route complies
    assert admin_app.AdminApp.api.operations


# --- answers --------------------------------------------------------------------------


def _entry() -> RequestEntry:
    return RequestEntry(
        request_id="6b1f7a0e-2f7c-4a4e-9d55-2c1f0f3d7a11",
        created_at="2025-01-01T00:00:00.000000Z",
        key_id=None,
        provider="openai",
        model="gpt-4o",
        method="POST",
        path="/v1/chat/completions",
        status=200,
        latency_ms=1.5,
        ttfb_ms=None,
        streamed=False,
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
        cached_tokens=0,
        cache_creation_tokens=0,
        usage_source="provider",
        error_type=None,
        reasoning_tokens=None,
        cache_creation_1h_tokens=None,
        response_model="gpt-4o-2024-08-06",
        cost_usd="0.000012",
        fallbacks=[{"provider": "azure", "reason": "5xx", "status": 503}],
    )


@pytest.mark.parametrize(
    ("record", "fields"),
    [
        (_entry(), s.REQUEST_FIELDS),
        (UsageTotal("m", 1, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 0, None, "0.1"), s.USAGE_FIELDS),
        ({"key": "m", "requests": 2}, s.USAGE_FIELDS),
    ],
)
def test_a_record_is_shown_as_before_without_a_deep_copy(record, fields, monkeypatch):
    values = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
    expected = {f: values.get(f) for f in fields}

    def no_copy(*args, **kwargs):
        raise AssertionError("a row is deep-copied before it is serialised")

    monkeypatch.setattr(dataclasses, "asdict", no_copy)
    assert admin_app.record_view(record, fields) == expected


def test_the_headers_to_explain_are_bounded():
    """86,000 headers (1 MiB) made each of the policy chain's header lookups
    a scan of all of them (30 to 70 ms); a proxy request carries at most 64
    KiB of headers."""
    headers = {f"h{i}": "" for i in range(86_000)}
    with pytest.raises(BadRequest) as refused:
        validate({"headers": headers}, s.EXPLAIN)
    assert refused.value.message == "headers must have at most 1000 fields"
    validate({"headers": dict(list(headers.items())[:1000])}, s.EXPLAIN)


# --- the number of values ---------------------------------------------------------------

_VALUES = st.sampled_from(["0", "[]", "{}", '"a"', '"a,b"', '{"a":[]}', "null", '{"a":1,"b":2}'])


@given(items=st.lists(_VALUES, min_size=1, max_size=60), cut=st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_body_over_the_commas_cap_is_refused_before_it_is_parsed(items, cut):
    """Whatever the values (commas in strings count too), a body with more
    commas than the cap is a 413, even one that is not JSON at all (``cut``:
    its closing bracket missing): it was never parsed. Within the cap, the
    body reads as JSON reads it."""
    raw = ("[" + ",".join(items) + ("" if cut else "]")).encode()
    cap = 30
    saved, validation.BODY_COMMAS_MAX = validation.BODY_COMMAS_MAX, cap
    try:
        if raw.count(b",") > cap:
            with pytest.raises(TooManyValues) as refused:
                parse_json_body(raw)
            assert (refused.value.status, refused.value.code) == (413, "too_many_values")
            assert refused.value.message == (
                f"the request body holds more than {cap} commas: "
                "the admin API takes smaller JSON documents"
            )
        elif cut:
            with pytest.raises(BadRequest) as refused:
                parse_json_body(raw)
            assert refused.value.code == "malformed_json"
        else:
            assert parse_json_body(raw) == json.loads(raw)
    finally:
        validation.BODY_COMMAS_MAX = saved


@pytest.mark.parametrize("item", ["0", "[]", '{"a":1}', '"ab"'])
def test_a_megabyte_of_small_values_is_refused_and_every_admin_document_fits(item):
    raw = _flat(item, MiB - 2).encode()
    with pytest.raises(TooManyValues):
        parse_json_body(raw)
    # the largest documents the admin API takes: a provider's model lists
    # (500 patterns of 200 characters each) and an explanation of a long
    # conversation, well within the cap
    lists = {"allowed_models": ["m" * 200] * 500, "blocked_models": ["b*"] * 500}
    assert parse_json_body(json.dumps(lists).encode()) == lists
    chat = {
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "word, " * 100}] * 60,
        }
    }
    assert parse_json_body(json.dumps(chat).encode()) == chat
    assert json.dumps(chat).count(",") < BODY_COMMAS_MAX
