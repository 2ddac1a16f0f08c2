"""A successful (2xx) answer is relayed as it comes, checked on the way for
an echo of the org's provider key: an upstream that echoes its request (a
debug endpoint, a misconfigured self-hosted server behind a custom provider)
must not hand the org's key to every holder of a Lectr key."""

from __future__ import annotations

import json
import string

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.providers.base import (
    ECHO_CORE_MIN,
    ECHO_TAIL_MASKED,
    echo_core,
    echo_tail_end,
    mask_echoes,
)
from tests.support.fake_provider import OPENAI_KEY, Script, openai_chat_completion, sse
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # a Lectr, an org with keys, the fake provider

KEY_CHARS = string.ascii_letters + string.digits + "-_"


def relay(pieces: list[bytes], core: bytes) -> tuple[bytes, list[bytes]]:
    """The pieces as ``Call.response_data`` and ``response_done`` relay them
    (the same quick test first); what the client receives, and each tail
    held on the way."""
    sent = []
    tails = []
    tail = b""
    for out in pieces:
        if not out:
            continue
        if tail or out.find(core) >= 0 or out[-1] in core:
            out, tail = mask_echoes(tail + out, core)
        else:
            # the quick test's promise: mask_echoes would change nothing
            assert mask_echoes(out, core) == (out, b"")
        sent.append(out)
        tails.append(tail)
    if tail:
        sent.append(echo_tail_end(tail))
    return b"".join(sent), tails


@st.composite
def answers(draw):
    """A key, and an answer holding copies of it (whole, or from anywhere in
    its first third on, or cut at the end) among text made of the key's own
    characters, cut into any pieces."""
    key = ("sk-proj-" + draw(st.text(alphabet=KEY_CHARS, min_size=16, max_size=60))).encode()
    filler = st.text(alphabet=KEY_CHARS + ' "{}:,\n', max_size=40).map(str.encode)
    parts = [draw(filler)]
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, len(key) // 3))
        parts.append(key[start:])
        parts.append(draw(filler))
    if draw(st.booleans()):  # ends with the start of the key
        parts.append(key[: draw(st.integers(1, len(key)))])
    body = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return key, body, pieces


@settings(max_examples=500, deadline=None)
@given(answers())
def test_no_piece_split_lets_an_echo_through(case):
    """Any answer in any pieces: the client gets as many bytes as were sent
    (a ``Content-Length`` stays true), each byte as it came or ``*``, never
    the key's identifying part; nothing is held longer than it may be the
    start of one; an answer without an echo arrives byte for byte."""
    key, body, pieces = case
    core = echo_core(key)
    assert core is not None
    out, tails = relay(pieces, core)
    assert len(out) == len(body)
    assert all(a == b or a == ord("*") for a, b in zip(out, body, strict=True))
    assert core not in out
    assert all(len(t) < len(core) and core.startswith(t) for t in tails)
    ends_like_key = any(body.endswith(core[:n]) for n in range(ECHO_TAIL_MASKED, len(core)))
    if core not in body and not ends_like_key:
        assert out == body


def test_a_short_or_starred_key_is_not_looked_for():
    """A key whose identifying part is shorter than ECHO_CORE_MIN would
    match ordinary text: it is not looked for (nor one holding the mask)."""
    assert ECHO_CORE_MIN == 12
    assert echo_core(b"x" * 16) is None  # (11 bytes past its first third)
    assert echo_core(b"x" * 17) == b"x" * 12
    assert echo_core(b"abc" * 10 + b"*" * 10) is None
    assert echo_core(b"k" * (ECHO_CORE_MIN * 3)) == b"k" * (ECHO_CORE_MIN * 2)


def test_a_short_tail_at_the_end_is_sent_as_it_is():
    """An answer ending in a few characters that begin the key is far
    likelier text than a key: sent unchanged; a longer one is masked."""
    assert echo_tail_end(b"abc") == b"abc"
    assert echo_tail_end(b"a" * ECHO_TAIL_MASKED) == b"*" * ECHO_TAIL_MASKED


# --- through the proxy ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_json_answer_echoing_the_key_reaches_the_client_masked(env):
    """A 200 JSON answer quoting the key it was sent: masked in place, the
    answer still valid JSON of the same length, its usage still counted."""
    doc = openai_chat_completion("gpt-4o-mini", content=f"You sent Bearer {OPENAI_KEY}.")
    body = json.dumps(doc).encode()
    env.provider.next(Script(body=body, headers={"content-type": "application/json"}))
    resp = await env.post("/v1/chat/completions", CHAT)
    out = await resp.content()
    assert resp.code == 200
    assert len(out) == len(body)
    assert OPENAI_KEY[len(OPENAI_KEY) // 3 :].encode() not in out
    answer = json.loads(out)
    assert answer["usage"] == doc["usage"]
    assert answer["choices"][0]["message"]["content"].startswith("You sent Bearer sk-")


@pytest_twisted.ensureDeferred
async def test_a_stream_echoing_the_key_across_events_reaches_the_client_masked(env):
    """A 200 stream whose events quote the key, one of them split across two
    writes of the provider: no part of the key's identifying part that
    completes it reaches the client, and every other byte does."""
    key = OPENAI_KEY
    half = len(key) // 2

    def chunk(text: str) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }

    whole = sse(chunk(f"key: {key}"))
    split = sse(chunk(f"again: {key}!"))
    at = split.index(key.encode()) + half
    events = [
        sse(chunk("Hello")),
        whole,
        split[:at],  # (the provider writes the event in two)
        split[at:],
        b"data: [DONE]\n\n",
    ]
    env.provider.next(
        Script(events=events, interval=0.02, headers={"content-type": "text/event-stream"})
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "stream": True})
    out = await resp.content()
    assert resp.code == 200
    core = key[len(key) // 3 :].encode()
    assert core not in out
    assert b'"Hello"' in out and out.endswith(b"data: [DONE]\n\n")
    masked = b"".join(events).replace(core, b"*" * len(core))
    assert masked in out  # (the usage report Lectr asked for, if any, is stripped)
