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
