"""A compressed answer is metered on a decompressed copy, and a compression
bomb cannot hold the reactor: no read decompresses to more than
DECODE_RATIO_MAX times its size (at least DECODE_STEP_MIN bytes). Lectr
asks every provider for ``Accept-Encoding: identity``, so only a provider
that ignores it sends compressed bytes at all; an honest compressed answer
(5-30 times smaller) is still metered exactly, whatever its reads."""

from __future__ import annotations

import gzip
import json
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.usage.meters import DECODE_RATIO_MAX, DECODE_STEP_MIN, _Decoder
from lectr.usage.model import NO_USAGE
from tests.support.fake_provider import openai_chat_completion
from tests.test_meters import (
    EXPECTED_ANTHROPIC,
    EXPECTED_CHAT,
    anthropic_events,
    chat_events,
    json_meter,
    meter_for,
    plan,
    run,
    split_at,
)

MiB = 1024 * 1024
JSON = b"application/json"
SSE = b"text/event-stream"


def _compress(data: bytes, wbits: int, level: int = 9) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def _reads(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Watched(_Decoder):
    """The meters' decoder, noting how much each read decompressed to."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, int]] = []

    def decode(self, data: bytes) -> bytes:
        plain = super().decode(data)
        self.steps.append((len(data), len(plain)))
        return plain


# 200 MiB of one letter in one stream event: 199 KiB of gzip
BOMB_EVENT = b'data: {"choices":[{"delta":{"content":"' + b"x" * (200 * MiB) + b'"}}]}\n\n'


@pytest.fixture(scope="module")
def bombs():
    return {wbits: _compress(BOMB_EVENT, wbits) for wbits in (31, 15)}  # gzip, zlib


@pytest.mark.parametrize("wbits", [31, 15], ids=["gzip", "deflate"])
@pytest.mark.parametrize("kind", ["stream", "json"])
def test_a_compression_bomb_is_given_up_within_one_step(bombs, wbits, kind):
    bomb = bombs[wbits]
    assert len(bomb) < MiB  # (200 MiB behind it)
    decoder = Watched()
    coding = b"gzip" if wbits == 31 else b"deflate"
    if kind == "stream":
        meter = meter_for(
            plan(body={"model": "m", "stream": True}), "openai", "/v1/chat/completions", 200, SSE,
            content_encoding=coding,
        )  # fmt: skip
    else:
        meter = json_meter(content_encoding=coding)
    meter._decoder = decoder
    out, usage = run(meter, _reads(bomb))
    assert out == bomb  # the client still gets every byte as it came
    assert usage == NO_USAGE  # not metered: no figure is made up
    assert decoder.failed
    for size, plain in decoder.steps:
        assert plain <= max(DECODE_STEP_MIN, size * DECODE_RATIO_MAX)
    # it stopped at the first read: not a byte decoded after that
    assert sum(plain for _, plain in decoder.steps) <= 64 * 1024 * DECODE_RATIO_MAX


@settings(max_examples=40, deadline=None)
@given(
    wbits=st.sampled_from([31, 15]),
    level=st.sampled_from([1, 6, 9]),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    kind=st.sampled_from(["chat", "anthropic", "json"]),
)
def test_an_honest_compressed_answer_is_metered_exactly_whatever_its_reads(
    wbits, level, cuts, kind
):
    coding = b"gzip" if wbits == 31 else b"deflate"
    if kind == "chat":
        body, expected = b"".join(chat_events()), EXPECTED_CHAT
        meter = meter_for(
            plan(body={"model": "m", "stream": True, "stream_options": {"include_usage": True}}),
            "openai", "/v1/chat/completions", 200, SSE, content_encoding=coding,
        )  # fmt: skip
    elif kind == "anthropic":
        body, expected = b"".join(anthropic_events()), EXPECTED_ANTHROPIC
        meter = meter_for(
            plan("anthropic", "/v1/messages", {"model": "c", "stream": True}),
            "anthropic", "/v1/messages", 200, SSE, content_encoding=coding,
        )  # fmt: skip
    else:
        body = json.dumps(openai_chat_completion("gpt-4o", prompt=30, completion=7)).encode()
        meter, expected = json_meter(content_encoding=coding), None
    packed = _compress(body, wbits, level)
    out, usage = run(meter, split_at(packed, cuts))
    assert out == packed
    if expected is None:
        assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (30, 7, "provider")
    else:
        assert usage == expected


def test_a_large_honest_answer_compressed_as_text_compresses_is_metered():
    """A 6 MiB answer of varied text (about 3x smaller as gzip) in 64 KiB
    reads: every read stays under the ratio, the usage is read."""
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]  # fmt: skip
    text = b" ".join(rng.choice(words) for _ in range(1_000_000)).decode()
    doc = openai_chat_completion("gpt-4o", prompt=30, completion=7)
    doc["choices"][0]["message"]["content"] = text
    body = json.dumps(doc).encode()
    assert len(body) > 5 * MiB
    packed = gzip.compress(body)
    meter = json_meter(content_encoding=b"gzip")
    out, usage = run(meter, _reads(packed))
    assert out == packed
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (30, 7, "provider")
