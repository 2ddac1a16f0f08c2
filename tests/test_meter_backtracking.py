"""No provider answer, and no request, can make a regular expression hold
the reactor: every pattern in Lectr's modules runs in time that grows with
its input, not exponentially.

A pattern whose repeated group can match the same text in two ways (say a
member that both ``,"service_tier":…`` and ``,"<any key>":…`` match) makes
a failing match try both ways for each repetition: 2^n for n repetitions.
An answer with 40 such members, then one byte that fails the pattern, would
hold the proxy's only thread for days. The JSON meter had one such pattern
(the members after a usage object); these tests pump every pattern of every
module with repeated JSON members and fragments, then end the input in a way
the pattern may refuse.

Each match runs under a deadline of several seconds: CPython's regular
expression engine checks for signals while it matches, so SIGALRM
interrupts it. A linear match of these inputs takes microseconds; the
deadline only turns a hang into a failure, it measures nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lectr
from lectr.usage.meters import (
    AnthropicStreamMeter,
    JsonMeter,
    OpenAIStreamMeter,
    _top_level_report,
)
from tests.support.deadline import TooSlow
from tests.support.deadline import deadline as _deadline

DEADLINE_S = 5.0
REPEAT = 40

# every module's patterns: most read what clients and providers send (the
# meters, request bodies and targets, headers, cursors, error bodies scrubbed
# of keys), and a pattern that only reads configuration costs nothing here
MODULES = [
    importlib.import_module(found.name) for found in pkgutil.walk_packages(lectr.__path__, "lectr.")
]
PATTERNS = sorted(
    (
        (f"{module.__name__}.{name}", value)
        for module in MODULES
        for name, value in vars(module).items()
        if isinstance(value, re.Pattern)
    ),
    key=lambda item: item[0],
)


def deadline(seconds: float = DEADLINE_S):
    return _deadline(seconds, "still matching (exponential backtracking)")


KEYS = [b'"service_tier"', b'"usage"', b'"model"', b'"text"', b'"a"', b'"a\\"b"', b'"x_y"']
VALUES = [b"1", b"-1.5e3", b'"x"', b'"\\u005f"', b"true", b"null", b"{", b"[", b'"', b"{}"]
members = st.builds(
    lambda sep, key, colon, value: sep + key + colon + value,
    st.sampled_from([b",", b", ", b"", b" ,"]),
    st.sampled_from(KEYS),
    st.sampled_from([b":", b" : ", b": "]),
    st.sampled_from(VALUES),
)
FRAGMENTS = [
    b",", b":", b"{", b"}", b"[", b"]", b'"', b"\\", b'\\"', b" ", b"\t", b"\n", b"1", b"-",
    b"e", b".", b"a", b"_", b"%", b"%4", b";", b"=", b"/", b"x", b"data: ", b"\\u",
    b"sk-", b"AIza", b"*", b"00-", b"@", b"lc_", b"/v1/",
]  # fmt: skip
units = st.one_of(
    st.lists(members, min_size=1, max_size=3).map(b"".join),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4).map(b"".join),
)
ends = st.lists(st.sampled_from([*FRAGMENTS, b"}", b"}}", b'"}']), max_size=3).map(b"".join)
pumped = st.builds(
    lambda head, unit, end: head + unit * REPEAT + end,
    st.sampled_from([b"", b'{"usage":{"a":1}', b'"usage":{"a":1}', b'{"model":"m",', b"x"]),
    units,
    ends,
)

# valid JSON: 40 service_tier members after the usage, then an object member
HOSTILE_MEMBERS = (
    b'{"model":"m","usage":{"prompt_tokens":1}' + b',"service_tier":1' * REPEAT + b',"a":{}}'
)


def _as(pattern: re.Pattern, data: bytes):
    return data if isinstance(pattern.pattern, bytes) else data.decode("latin-1")


def test_the_modules_have_patterns_to_check():
    names = {name for name, _ in PATTERNS}
    assert "lectr.usage.meters._COMPACT_SCALAR_MEMBERS_TO_END_RE" in names
    assert "lectr.providers.base._KEYLIKE_BYTES" in names  # (error bodies scrubbed of keys)
    assert "lectr.managers.usage._CURSOR_RE" in names
    assert len(PATTERNS) > 60


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=pumped)
@example(data=b',"service_tier":1' * REPEAT + b",x")
@example(data=b'"usage":{"a":1}' + b',"service_tier":"x"' * REPEAT + b"}}")
@example(data=b" , " * REPEAT + b"x")
def test_no_pattern_backtracks_exponentially(data):
    for name, pattern in PATTERNS:
        text = _as(pattern, data)
        with deadline():
            try:
                pattern.fullmatch(text)
                pattern.match(text)
                pattern.search(text)
            except TooSlow as slow:
                raise AssertionError(f"{name}: {slow}") from None


def test_the_answer_that_held_the_reactor_is_read_at_once():
    """40 ``service_tier`` members after the usage, then an object member:
    the members pattern refused it after 2^40 tries (2 s for 22)."""
    with deadline():
        assert _top_level_report(HOSTILE_MEMBERS, True) is None  # (a full parse reads it)
        meter = JsonMeter("openai")
        meter.feed(HOSTILE_MEMBERS)
        usage = meter.finish()
    assert (usage.prompt_tokens, usage.service_tier, usage.model) == (1, None, "m")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=pumped, kind=st.sampled_from(["openai", "anthropic"]))
@example(data=HOSTILE_MEMBERS, kind="openai")
def test_no_answer_holds_the_meters(data, kind):
    """The meters end to end (the fast path, its fallbacks, the stream
    meters' event scans) on the same pumped answers, whole and as an SSE
    event."""
    event = b"data: " + data + b"\n\n"
    with deadline():
        for tier in (True, False):
            _top_level_report(data, tier)
        meter = JsonMeter(kind)
        meter.feed(data)
        meter.finish()
        stream = OpenAIStreamMeter() if kind == "openai" else AnthropicStreamMeter()
        stream.feed(event)
        stream.finish()


# --- strings read in runs, not byte by byte ---------------------------------------
# A JSON string's body was read as (?:[^"\\]|\\.)*: one alternation per byte,
# about 47 ns a byte (an Anthropic event's text 2.8 us, a 1 MiB line 50 ms).
# The same language unrolled, [^"\\]*(?:\\.[^"\\]*)*, runs over plain bytes at
# memchr-like speed and still has one way to match.
UNROLLED = {
    rb'[^"\\]*(?:\\.[^"\\]*)*': rb'(?:[^"\\]|\\.)*',
    rb'[^"\\\r\n]*(?:\\.[^"\\\r\n]*)*': rb'(?:[^"\\\r\n]|\\.)*',
}
UNROLLED_PATTERNS = [
    (name, pattern)
    for name, pattern in PATTERNS
    if isinstance(pattern.pattern, bytes) and any(u in pattern.pattern for u in UNROLLED)
]


def _per_byte(pattern: re.Pattern) -> re.Pattern:
    text = pattern.pattern
    for unrolled, per_byte in UNROLLED.items():
        text = text.replace(unrolled, per_byte)
    return re.compile(text, pattern.flags)


def test_every_json_string_pattern_reads_in_runs():
    names = {name for name, _ in UNROLLED_PATTERNS}
    assert {
        "lectr.usage.meters._ANTHROPIC_TEXT_RE",
        "lectr.usage.meters._TIER_MEMBER_RE",
        "lectr.usage.meters._JSON_TEXT_RE",
        "lectr.providers.body._PARAM",
    } <= names
    for name, pattern in PATTERNS:
        text = pattern.pattern if isinstance(pattern.pattern, bytes) else pattern.pattern.encode()
        assert not any(per_byte in text for per_byte in UNROLLED.values()), name


string_bytes = st.lists(
    st.sampled_from([b'"', b"\\", b'\\"', b"\\\\", b"a", b" ", b"\n", b"\r", b":", b"{", b"x_y"])
    | st.sampled_from([b'"text":"', b'"service_tier":', b'"model": "', b'"a":"b"', b"; q="]),
    max_size=30,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=string_bytes, start=st.integers(0, 8))
def test_the_unrolled_patterns_read_what_the_per_byte_ones_read(data, start):
    for name, pattern in UNROLLED_PATTERNS:
        old = _per_byte(pattern)
        for method in ("match", "fullmatch", "search"):
            got, want = getattr(pattern, method)(data, start), getattr(old, method)(data, start)
            assert (got and (got.span(), got.groups())) == (
                want and (want.span(), want.groups())
            ), (
                name,
                method,
            )
        assert [m.groups() for m in pattern.finditer(data)] == [
            m.groups() for m in old.finditer(data)
        ], name
