"""What ties a request to a conversation (lectr.policy.plan.request_affinity):
a session header, the body's session fields, or a digest of the prompt prefix
the provider would cache. Any body read_body accepts gives an affinity or
None, never an exception (lone surrogates included: valid JSON escapes)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.http.headers import HeaderList
from lectr.policy.plan import SESSION_MAX, request_affinity
from lectr.providers.body import read_body
from lectr.providers.dialects import ANTHROPIC, OPENAI

NO_HEADERS = HeaderList([])
# text as a client may send it: any code point, lone surrogates included
TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=60)


def read(doc: dict):
    # ensure_ascii: lone surrogates travel as \ud800 escapes, as in real JSON
    return read_body([b"application/json"], json.dumps(doc).encode())


def long_prompt(piece: str) -> list[dict]:
    return [{"role": "user", "content": piece + "x" * 5000}]


@settings(max_examples=200)
@given(piece=TEXT, marked=st.booleans())
def test_any_prompt_gives_an_affinity_or_none(piece, marked):
    openai = read({"model": "m", "messages": long_prompt(piece)})
    assert request_affinity(NO_HEADERS, OPENAI, openai).startswith(b"p:")
    block = {"type": "text", "text": piece + "y" * 100}
    if marked:
        block["cache_control"] = {"type": "ephemeral"}
    anthropic = read(
        {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [block]}]}
    )
    got = request_affinity(NO_HEADERS, ANTHROPIC, anthropic)
    assert (got is not None and got.startswith(b"p:")) == marked


@given(piece=TEXT)
def test_the_same_prefix_gives_the_same_affinity(piece):
    a = read({"model": "m", "messages": long_prompt(piece) + [{"role": "user", "content": "1"}]})
    b = read({"model": "m", "messages": long_prompt(piece) + [{"role": "user", "content": "2"}]})
    assert request_affinity(NO_HEADERS, OPENAI, a) == request_affinity(NO_HEADERS, OPENAI, b)


def test_short_prompts_have_no_prefix_and_sessions_win():
    short = read({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request_affinity(NO_HEADERS, OPENAI, short) is None
    keyed = read({"model": "m", "user": "u-1", "messages": long_prompt("")})
    assert request_affinity(NO_HEADERS, OPENAI, keyed) == b"s:u-1"
    header = HeaderList([(b"x-lectr-session", b"z" * 600)])
    assert request_affinity(header, OPENAI, keyed) == b"s:" + b"z" * SESSION_MAX


# --- the prompt prefix costs what the prefix holds ---------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(TEXT, inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=500)
@given(value=JSON_VALUES, room=st.integers(0, 300))
def test_the_prefix_text_is_the_start_of_the_compact_serialisation(value, room):
    from lectr.providers.dialects import _PREFIX_ENCODER, _prefix_text

    full = _PREFIX_ENCODER.encode(value)
    out: list[str] = []
    n = _prefix_text(value, room, out)
    text = "".join(out)
    assert n == len(text)
    assert full.startswith(text)
    assert len(text) >= min(room, len(full))  # all of it, or at least room characters
    assert len(text) <= room + 30 or text == full  # (past room: one scalar's text at most)


def reference_prefix(doc: dict) -> bytes | None:
    """The OpenAI prefix digest as it was computed before: every piece serialised whole."""
    from lectr.providers.dialects import _PREFIX_BYTES, _PREFIX_ENCODER, _digest

    prompt = doc.get("messages")
    if prompt is None:
        prompt = doc.get("input")
    if prompt is None:
        return None
    pieces = [doc.get("instructions"), doc.get("tools")]
    pieces.extend(prompt if isinstance(prompt, list) else [prompt])
    out = bytearray()
    for piece in pieces:
        out += _PREFIX_ENCODER.encode(piece).encode("utf-8", "surrogatepass")
        if len(out) >= _PREFIX_BYTES:
            return _digest(bytes(out[:_PREFIX_BYTES]))
    return None


@settings(max_examples=200)
@given(
    messages=st.lists(JSON_VALUES, max_size=8),
    filler=st.integers(0, 6000),
    tools=st.none() | JSON_VALUES,
    where=st.sampled_from(["messages", "input"]),
)
def test_the_openai_prefix_digest_is_the_one_of_the_whole_serialisation(
    messages, filler, tools, where
):
    doc = {where: [*messages, {"role": "user", "content": "é" * filler}], "tools": tools}
    assert OPENAI.cache_prefix(doc) == reference_prefix(doc)


def test_a_huge_prompt_is_not_serialised_whole():
    """A 15 MiB message or a list of millions of values: the prefix is read
    from their start (the digest is the whole serialisation's)."""
    from lectr.providers.dialects import _prefix_text

    big = {"messages": [{"role": "user", "content": "A" * (15 * 1024 * 1024)}]}
    many = {"messages": [{"role": "user", "content": [0] * 3_000_000}]}
    for doc in (big, many):
        assert OPENAI.cache_prefix(doc) == reference_prefix(doc)
        out: list[str] = []
        _prefix_text(doc["messages"], 8192, out)
        assert sum(map(len, out)) < 8192 + 40


def test_an_anthropic_breakpoint_is_looked_for_in_the_first_blocks_only():
    from lectr.providers.dialects import _BREAKPOINT_BLOCKS_MAX

    marked = {"type": "text", "text": "x" * 100, "cache_control": {"type": "ephemeral"}}

    def doc(blocks_before: int) -> dict:
        content = [{"type": "text", "text": "a"}] * blocks_before + [marked]
        return {"messages": [{"role": "user", "content": content}]}

    near = ANTHROPIC.cache_prefix(doc(_BREAKPOINT_BLOCKS_MAX - 10))
    assert near is not None and near == ANTHROPIC.cache_prefix(doc(_BREAKPOINT_BLOCKS_MAX - 10))
    assert ANTHROPIC.cache_prefix(doc(_BREAKPOINT_BLOCKS_MAX)) is None  # (too deep: no hint)
    # millions of blocks and no breakpoint: the walk stops at the budget
    assert ANTHROPIC.cache_prefix(doc(3_000_000)) is None
    # the budget is per request, across sections and nesting
    tools = [{"name": f"t{i}"} for i in range(_BREAKPOINT_BLOCKS_MAX // 2)]
    nested = {"tools": tools, **doc(_BREAKPOINT_BLOCKS_MAX // 2)}
    assert ANTHROPIC.cache_prefix(nested) is None
