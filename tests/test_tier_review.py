"""Review of the service tier and web search feature: the cases the first
tests missed, each pinned with its exact expected value.

- An OpenAI Responses answer names its ``service_tier`` *before* its usage,
  and ``user`` and ``metadata`` (an object) follow the usage: an answer too
  large to parse whole (> 256 KiB) must still read the tier from its tail
  window, and so must a stream's ``response.completed`` event too large to
  keep (> 1 MiB).
- A bare ``data`` line (empty data) is no JSON chunk: the stream's tier
  fallback reads the same whatever the split of the stream into reads.
- The explanation (``breakdown`` over the stored basis's rates) equals the
  stored cost for any usage, service tier and web-search count."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.metrics import Registry
from lectr.pricing.catalogue import load_catalogue, parse_entry
from lectr.pricing.cost import breakdown, cost_of
from lectr.pricing.manager import PricingManager
from lectr.usage.meters import (
    JSON_FULL_PARSE_MAX,
    SSE_LINE_MAX,
    JsonMeter,
    OpenAIStreamMeter,
    openai_usage,
)
from lectr.usage.model import Usage, service_tier_of
from tests.test_meters import split_at

USAGE = {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}


def compact(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def response_doc(text: str, tier="flex", **extra) -> dict:
    """A Responses API answer, its members in OpenAI's order: the tier
    between the output and the usage, ``user`` and ``metadata`` after it."""
    doc = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "gpt-5-2025-08-07",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": None},
        "service_tier": tier,
        "store": True,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tools": [],
        "usage": dict(USAGE),
        "user": None,
        "metadata": {},
    }
    doc.update(extra)
    return doc


def read_json(body: bytes, step: int = 65536) -> Usage:
    meter = JsonMeter("openai")
    for i in range(0, len(body), step):
        meter.feed(body[i : i + step])
    return meter.finish()


BIG = "word " * (JSON_FULL_PARSE_MAX // 4)


def test_a_large_responses_answer_reads_the_tier_before_its_usage():
    for tier in ("flex", "priority", "default"):
        body = compact(response_doc(BIG, tier))
        assert len(body) > JSON_FULL_PARSE_MAX
        usage = read_json(body)
        assert (usage.service_tier, usage.prompt_tokens, usage.completion_tokens) == (tier, 9, 3)
        # spaced out as json.dumps writes it, too
        assert (
            read_json(json.dumps(response_doc(BIG, tier), indent=1).encode()).service_tier == tier
        )


def test_a_large_responses_answer_decoys():
    # nested keys (a tool's parameters, the metadata after the usage) are not the answer's
    tools = [{"type": "function", "parameters": {"service_tier": "priority"}}]
    meta = {"service_tier": "priority"}
    body = compact(response_doc(BIG, "flex", tools=tools, metadata=meta))
    assert read_json(body).service_tier == "flex"
    # none at the top level: none
    doc = response_doc(BIG, tools=tools, metadata=meta)
    del doc["service_tier"]
    assert read_json(compact(doc)).service_tier is None
    # a hostile tier is none
    assert read_json(compact(response_doc(BIG, "FLEX"))).service_tier is None
    assert read_json(compact(response_doc(BIG, 7))).service_tier is None
    # a later top-level member wins, as in a full parse (after the usage, or before it)
    doc = response_doc(BIG, "flex")
    doc["metadata2"] = {}
    body = compact(doc)[:-1] + b',"service_tier":"priority"}'
    assert json.loads(body)["service_tier"] == "priority"
    assert read_json(body).service_tier == "priority"
    body = compact(doc).replace(b'"store":true', b'"store":true,"service_tier":"scale"')
    assert json.loads(body)["service_tier"] == "scale"
    assert read_json(body).service_tier == "scale"
    # an escaped key between the raw one and the usage is read as a full parse reads it
    body = compact(doc).replace(b'"store":true', b'"service\\u005ftier":"scale"')
    assert json.loads(body)["service_tier"] == "scale"
    assert read_json(body).service_tier == "scale"


def sse(name: str, doc) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + compact(doc) + b"\n\n"


def test_a_responses_stream_with_a_completed_event_too_large_to_keep_reads_its_tier():
    big = "word " * (SSE_LINE_MAX // 4)
    created = response_doc("", "auto", status="in_progress", usage=None)
    created["output"] = []
    completed = response_doc(big, "flex")
    stream = sse(
        "response.created", {"type": "response.created", "sequence_number": 0, "response": created}
    ) + sse(
        "response.completed",
        {"type": "response.completed", "sequence_number": 9, "response": completed},
    )
    assert len(stream) > SSE_LINE_MAX
    for step in (65536, 1 << 20):
        meter = OpenAIStreamMeter()
        for i in range(0, len(stream), step):
            meter.feed(stream[i : i + step])
        meter.flush()
        usage = meter.finish()
        assert (usage.source, usage.prompt_tokens, usage.service_tier) == ("provider", 9, "flex")
    # the sequence number last, the response first: the same
    stream = sse(
        "response.completed",
        {"response": completed, "type": "response.completed", "sequence_number": 9},
    )
    meter = OpenAIStreamMeter()
    meter.feed(stream)
    assert meter.finish().service_tier == "flex"


CHUNK = b'data: {"model":"m","service_tier":"priority","choices":[{"delta":{"content":"hi"}}]}\n\n'
REPORT = (
    b'data: {"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    b"data: [DONE]\n\n"
)


def stream_tier(pieces) -> str | None:
    meter = OpenAIStreamMeter()
    for piece in pieces:
        meter.feed(piece)
    meter.flush()
    return meter.finish().service_tier


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), max_size=4))
@example(cuts=[])
def test_a_bare_data_line_is_no_json_chunk_whatever_the_reads(cuts):
    # "data" alone is an empty data line; the line after it has no field name:
    # SSE ignores it, so the first JSON chunk is the next event
    stream = b'data\n{"service_tier":"flex"}\n\n' + CHUNK + REPORT
    assert stream_tier([bytes([c]) for c in stream]) == "priority"
    assert stream_tier(split_at(stream, cuts)) == "priority"


# --- the explanation equals the stored cost ---------------------------------------------------

PRICING = PricingManager(None, reactor=None, metrics=Registry(), catalogue=load_catalogue())
LAYERED = parse_entry(
    "custom",
    "m",
    {
        "checked": "2025-01-01",
        "input": "0.5",
        "output": "1",
        "cached_input": "0.1",
        "cache_write_1h": "0.000003",
        "long_context": {"threshold": 100, "input": "10", "output": "20"},
        "web_search": "0.000001",
        "tiers": {
            "flex": {"input": "1", "output": "2", "cache_write_5m": "0.123457"},
            "priority": {
                "input": "3",
                "output": "6",
                "long_context": {"threshold": 50, "input": "30", "output": "60"},
            },
        },
    },
    source="override",
)


def _entry(name):
    if name == "layered":
        return LAYERED
    return PRICING.resolve("anthropic" if name.startswith("claude") else "openai", name)


_COUNT = st.none() | st.integers(0, 2**31 - 1)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["layered", "o3", "gpt-5", "claude-sonnet-4-5", "gpt-4o-mini"]),
    tier=st.sampled_from([None, "flex", "priority", "default", "standard", "FLEX", "batch"]),
    prompt=_COUNT,
    cached=_COUNT,
    writes=_COUNT,
    writes_1h=_COUNT,
    completion=_COUNT,
    searches=_COUNT,
    source=st.sampled_from(["provider", "estimated"]),
    request_bytes=st.integers(0, 10**9),
)
@example(
    name="layered",
    tier="priority",
    prompt=51,
    cached=60,
    writes=7,
    writes_1h=9,
    completion=1,
    searches=3,
    source="provider",
    request_bytes=0,
)
def test_the_explanation_equals_the_stored_cost(
    name, tier, prompt, cached, writes, writes_1h, completion, searches, source, request_bytes
):
    entry = _entry(name)
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cache_creation_tokens=writes,
        cache_creation_1h_tokens=writes_1h,
        source=source,
        service_tier=service_tier_of(tier),
        web_search_requests=searches,
    )
    priced = cost_of(entry, usage, request_bytes)
    if priced.cost_usd is None:
        return
    basis = json.loads(priced.basis.json)
    if searches and basis["rates"].get("web_search") is not None:
        assert Decimal(basis["rates"]["web_search"]) == entry.web_search
    served = service_tier_of(tier)
    listed = entry.by_tier is not None and served in entry.by_tier
    assert basis.get("service_tier") == (served if listed else None)
    # what the explanation reads back from the row (the estimated prompt is written to it)
    stored_prompt = prompt if prompt is not None else (priced.prompt_estimate or 0)
    _, total = breakdown(
        {k: Decimal(v) for k, v in basis["rates"].items()},
        prompt_tokens=stored_prompt,
        cached_tokens=cached or 0,
        cache_creation_tokens=writes or 0,
        cache_creation_1h_tokens=writes_1h or 0,
        completion_tokens=completion or 0,
        web_search_requests=searches or 0,
    )
    assert total == priced.cost_usd


def test_openai_usage_keeps_only_a_guarded_tier():
    for value, expected in [(b"flex", "flex"), ("flex", "flex"), (b"FLEX", None), (b"\xff", None)]:
        assert openai_usage({"prompt_tokens": 1}, None, None, value).service_tier == expected


# --- generated answers too large to parse whole, against a full parse -------------------------

_TIER_VALUES = st.one_of(
    st.sampled_from(["flex", "priority", "default", "FLEX", "", "x" * 33, "fl ex"]),
    st.sampled_from([None, 7, 1.5, True, ["flex"], {"service_tier": "flex"}]),
)
_DECOY_TEXT = st.sampled_from(['"service_tier":"flex"', "service_tier", '\\"', "{", "[", "é"])


@st.composite
def large_answers(draw) -> bytes:
    """A chat or Responses answer over 256 KiB: bulky output first, then
    scalar and object members (decoys with a nested service_tier among
    them), the usage, more members; top-level service_tier members (raw or
    spelled with an escape) anywhere after the output."""
    sep = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    indent = draw(st.sampled_from([None, 1]))

    def dumps(value) -> str:
        return json.dumps(value, separators=sep, ensure_ascii=draw(st.booleans()))

    members = [('"id"', dumps("x")), ('"model"', dumps("gpt-5"))]
    members.append(('"output"', dumps([{"text": BIG + draw(_DECOY_TEXT)}])))
    middle = [
        ('"store"', "true"),
        ('"text"', dumps({"format": {"type": "text"}})),
        ('"note"', dumps(draw(_DECOY_TEXT))),
    ]
    for _ in range(draw(st.integers(0, 3))):
        middle.append(('"tools"', dumps([{"parameters": {"service_tier": draw(_TIER_VALUES)}}])))
    middle = draw(st.permutations(middle))
    members += middle
    members.append(('"usage"', dumps(USAGE)))
    after = [('"user"', "null"), ('"system_fingerprint"', dumps("fp"))]
    if draw(st.booleans()):
        after.append(('"metadata"', dumps({"service_tier": draw(_TIER_VALUES)})))
    members += draw(st.permutations(after))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(['"service_tier"', '"service_tier"', '"service\\u005ftier"']))
        members.insert(draw(st.integers(3, len(members))), (key, dumps(draw(_TIER_VALUES))))
    text = "{" + sep[0].join(k + sep[1] + v for k, v in members) + "}"
    if indent is not None:
        text = text.replace(sep[0] + '"', sep[0] + "\n " + '"')
    return text.encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=large_answers(), step=st.sampled_from([65536, 100_003, 1 << 20]))
@example(
    body=(
        b'{"model":"m","output":[{"text":"' + BIG.encode() + b'"}],"service_tier":"flex",'
        b'"tools":[{"parameters":{"service_tier":"priority"}}],"usage":{"input_tokens":9},'
        b'"user":null,"metadata":{}}'
    ),
    step=65536,
)
@example(  # (found by CI's seed 11: four nested keys after the top-level one, one in a string)
    body=(
        b'{"model":"gpt-5","output":[{"text":"'
        + BIG.encode()
        + b' \\"service_tier\\":\\"flex\\""}],'
        b'"service_tier":"flex","note":"\\"service_tier\\":\\"flex\\"",'
        b'"tools":[{"parameters":{"service_tier":"flex"}}],'
        b'"tools":[{"parameters":{"service_tier":"flex"}}],'
        b'"tools":[{"parameters":{"service_tier":{"service_tier":"flex"}}}],'
        b'"usage":{"input_tokens":9,"output_tokens":3,"total_tokens":12},'
        b'"user":null,"system_fingerprint":"fp"}'
    ),
    step=65536,
)
def test_a_large_answer_reads_the_tier_a_full_parse_reads(body, step):
    assert len(body) > JSON_FULL_PARSE_MAX
    expected = service_tier_of(json.loads(body).get("service_tier"))
    usage = read_json(body, step)
    assert usage.prompt_tokens == 9
    if b"\\u005f" not in body:
        assert usage.service_tier == expected
    elif usage.service_tier is not None:
        assert usage.service_tier == expected  # never a wrong one
