"""The service tier and the web searches every metered answer reports
(lectr.usage.meters): OpenAI's top-level ``service_tier`` (JSON answers,
chat and legacy completions streams, the Responses API), Anthropic's
``usage.service_tier`` and ``usage.server_tool_use.web_search_requests``
(JSON answers and streams), always through ``service_tier_of``.

The references are full parses (``json.loads``); decoys (a nested
``service_tier`` key before or after the usage, a content string holding
one, hostile values) never yield a tier, and any split of a stream into
reads reads the same."""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.providers.body import read_body
from lectr.usage.meters import (
    JSON_FULL_PARSE_MAX,
    AnthropicStreamMeter,
    JsonMeter,
    OpenAIStreamMeter,
    _top_level_report,
    anthropic_usage,
    meter_for,
    openai_usage,
    plan_request,
)
from lectr.usage.model import NO_USAGE, Usage, service_tier_of
from tests.test_meters import split_at

JSON = b"application/json"
SSE = b"text/event-stream"
CHAT = "/v1/chat/completions"
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def read_json(body: bytes, kind: str = "openai", pieces: list[bytes] | None = None) -> Usage:
    meter = JsonMeter(kind)
    for piece in pieces if pieces is not None else [body]:
        assert meter.feed(piece) is piece
    return meter.finish()


def chat_answer(**members) -> dict:
    """An OpenAI chat completion, its members in OpenAI's order (the tier after the usage)."""
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": dict(USAGE),
    }
    doc.update(members)
    return doc


def compact(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --- OpenAI JSON answers ------------------------------------------------------------


def test_a_chat_answer_names_its_tier_after_the_usage_and_the_fast_path_reads_it():
    for tier in ("default", "flex", "priority", "scale"):
        body = compact(chat_answer(service_tier=tier, system_fingerprint="fp_1"))
        found = _top_level_report(body, True)
        assert found is not None and found[3] == tier.encode()  # no full parse
        usage = read_json(body)
        assert (usage.service_tier, usage.prompt_tokens, usage.model) == (
            tier,
            12,
            "gpt-4o-2024-08-06",
        )
        assert usage.web_search_requests is None
    spaced = json.dumps(chat_answer(service_tier="flex")).encode()
    assert read_json(spaced).service_tier == "flex"
    assert read_json(compact(chat_answer())).service_tier is None


def test_a_tier_before_the_usage_is_read_by_the_full_parse():
    doc = {"id": "x", "model": "gpt-4o", "service_tier": "priority", **chat_answer()}
    body = compact(doc)
    assert body.index(b'"service_tier"') < body.index(b'"usage"')
    assert _top_level_report(body, True) is None  # (it cannot tell: a full parse)
    assert _top_level_report(body, False) is not None  # (without the tier, as before)
    assert read_json(body).service_tier == "priority"


def test_legacy_completions_and_responses_answers():
    legacy = {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "Hi", "index": 0, "finish_reason": "stop"}],
        "usage": dict(USAGE),
        "service_tier": "default",
    }
    assert read_json(compact(legacy)).service_tier == "default"
    response = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
        "service_tier": "flex",
        "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
        "user": None,
        "metadata": {},
    }
    usage = read_json(compact(response))
    assert (usage.service_tier, usage.prompt_tokens, usage.completion_tokens) == ("flex", 9, 3)


DECOY_ANSWERS = [
    # a nested object holding the key, before or after the usage
    {**chat_answer(), "metadata": {"service_tier": "flex"}},
    {"metadata": {"service_tier": "flex"}, **chat_answer()},
    {**chat_answer(), "x": [{"service_tier": "flex"}], "system_fingerprint": "fp"},
    # text holding the key (escaped quotes), and a value that spells it
    chat_answer(choices=[{"message": {"content": '"service_tier":"flex"'}}]),
    chat_answer(choices=[{"message": {"content": 'x","service_tier":"flex'}}]),
    {**chat_answer(), "note": "service_tier", "other": "flex"},
    {**chat_answer(), 'a"service_tier': "flex"},
    {'a"service_tier': "flex", **chat_answer()},
    # a tool's arguments: a JSON string
    chat_answer(
        choices=[
            {
                "message": {
                    "tool_calls": [
                        {"function": {"arguments": json.dumps({"service_tier": "flex"})}}
                    ]
                }
            }
        ]
    ),
    # hostile values
    *(
        chat_answer(service_tier=value)
        for value in (
            None,
            7,
            1.5,
            True,
            "",
            "FLEX",
            "Flex",
            "x" * 33,
            "fl ex",
            "flex\n",
            "flé",
            "\U0001f600",
            "\ud800",
            ["flex"],
            {"service_tier": "flex"},
        )
    ),
]


def test_decoys_and_hostile_values_never_yield_a_tier():
    for doc in DECOY_ANSWERS:
        for body in (compact(doc), json.dumps(doc).encode(), json.dumps(doc, indent=1).encode()):
            usage = read_json(body)
            assert usage.prompt_tokens == 12, body
            assert usage.service_tier is None, body


def test_the_last_top_level_member_wins_as_in_a_full_parse():
    # (duplicate keys: Python's json, and so a full parse, keep the last)
    for body, tier in [
        (
            b'{"model":"m","usage":{"prompt_tokens":1},"service_tier":"flex","service_tier":null}',
            None,
        ),
        (
            b'{"model":"m","usage":{"prompt_tokens":1},"service_tier":7,"service_tier":"flex"}',
            "flex",
        ),
        (
            b'{"model":"m","service_tier":"scale","usage":{"prompt_tokens":1},"service_tier":"flex"}',
            "flex",
        ),
        (b'{"model":"m","usage":{"prompt_tokens":1},"service_tier":"fl\\u0065x"}', "flex"),
        (b'{"model":"m","usage":{"prompt_tokens":1},"service\\u005ftier":"flex"}', "flex"),
        (b'{"model":"m","usage":{"prompt_tokens":1},"a":"\\"","service_tier":"flex"}', "flex"),
    ]:
        assert service_tier_of(json.loads(body).get("service_tier")) == tier
        assert read_json(body).service_tier == tier, body


def test_an_answer_too_large_to_parse_whole_reads_the_tier_after_its_usage():
    text = "word " * (JSON_FULL_PARSE_MAX // 4)
    body = compact(chat_answer(choices=[{"message": {"content": text}}], service_tier="priority"))
    assert len(body) > JSON_FULL_PARSE_MAX
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    assert read_json(body, pieces=pieces).service_tier == "priority"
    nested = compact(
        {**chat_answer(choices=[{"message": {"content": text}}]), "m": {"service_tier": "flex"}}
    )
    pieces = [nested[i : i + 65536] for i in range(0, len(nested), 65536)]
    assert read_json(nested, pieces=pieces).service_tier is None


def test_a_cut_answer_is_estimated_without_a_tier():
    body = compact(chat_answer(service_tier="flex"))
    meter = JsonMeter("openai")
    meter.feed(body[:-20])
    usage = meter.finish(False)
    assert usage.source == "estimated" and usage.service_tier is None


# --- generated OpenAI answers: the fast path against a full parse -------------------

_TIERS = st.sampled_from(["default", "flex", "priority", "scale", "a", "on_demand", "x-1"])
_HOSTILE = st.one_of(
    st.sampled_from(["null", "7", "-1.5e3", "true", '""', '"FLEX"', '"' + "x" * 33 + '"']),
    st.sampled_from(['"fl\\u0065x"', '"\\u0066lex"', '"flé"', '"\\ud800"', '"a b"', '"\\n"']),
    st.text(max_size=8).map(json.dumps),
    _TIERS.map(json.dumps),
)
_TEXT = st.one_of(
    st.text(max_size=10),
    st.sampled_from(['"service_tier":"flex"', "service_tier", "_", '"', "\\", "{", "["]),
)


@st.composite
def tiered_answers(draw) -> bytes:
    """An OpenAI-shaped answer: head scalars, bulky members with decoys (a
    nested service_tier, the key in text), the usage, trailing scalars; a
    top-level service_tier (valid, hostile, escaped, or none) anywhere."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]))

    def dumps(value) -> str:
        return json.dumps(value, separators=sep, ensure_ascii=rnd.random() < 0.5)

    members = [
        ('"id"', dumps("chatcmpl-1")),
        ('"model"', dumps("gpt-4o")),
        (
            '"choices"',
            dumps(
                [
                    {
                        "message": {"content": draw(_TEXT)},
                        "finish_reason": "stop",
                        **({"service_tier": draw(_TEXT)} if draw(st.booleans()) else {}),
                    }
                ]
            ),
        ),
    ]
    if draw(st.booleans()):
        members.append(('"metadata"', dumps({"service_tier": draw(_TIERS)})))
    members.append(('"usage"', dumps(USAGE)))
    trailing = draw(st.lists(st.sampled_from(["system_fingerprint", "x", "note"]), unique=True))
    for key in trailing:
        members.append((json.dumps(key), dumps(draw(_TEXT))))
    if draw(st.booleans()):
        members.append(('"metadata2"', dumps({"service_tier": draw(_TIERS)})))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(['"service_tier"', '"service_tier"', '"service\\u005ftier"']))
        members.insert(draw(st.integers(0, len(members))), (key, draw(_HOSTILE)))
    return ("{" + sep[0].join(k + sep[1] + v for k, v in members) + "}").encode()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=tiered_answers(), cuts=st.lists(st.integers(min_value=0), max_size=4))
@example(
    body=b'{"id":"x","model":"m","usage":{"prompt_tokens":1},"service_tier":"a","service_tier":null}',
    cuts=[],
)
def test_the_fast_path_and_a_full_parse_read_the_same_tier(body, cuts):
    doc = json.loads(body)
    expected = service_tier_of(doc.get("service_tier"))
    found = _top_level_report(body, True)
    if found is not None and b"\\u005f" not in body[: body.rfind(b'"usage"')]:
        # (a key spelled with an escape before the usage is not seen: documented)
        usage = openai_usage(found[0], found[1], found[2], found[3])
        assert usage.service_tier == expected
    usage = read_json(body, pieces=split_at(body, cuts))
    if b"\\u005f" not in body[: body.rfind(b'"usage"')]:
        assert usage.service_tier == expected
    elif usage.service_tier is not None:
        assert usage.service_tier == expected  # never a wrong one
    counts = openai_usage(doc["usage"], doc["model"])
    assert (usage.prompt_tokens, usage.model) == (counts.prompt_tokens, counts.model)


# --- OpenAI streams -----------------------------------------------------------------


def sse(doc) -> bytes:
    return b"data: " + compact(doc) + b"\n\n"


def chat_chunks(words, tiers, report_tier=None, usage=True) -> list[bytes]:
    """A chat stream as OpenAI sends it with include_usage: every chunk
    names its tier (``tiers[i]``, or none: ``...``), right after the model."""

    def chunk(tier, choices, u) -> bytes:
        doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
        doc["model"] = "gpt-4o-mini"
        if tier is not ...:
            doc["service_tier"] = tier
        doc["system_fingerprint"] = "fp_1"
        doc["choices"] = choices
        doc["usage"] = u
        return sse(doc)

    events = []
    for i, word in enumerate(words):
        delta = {"content": word}
        events.append(chunk(tiers[i % len(tiers)], [{"index": 0, "delta": delta}], None))
    if usage:
        events.append(chunk(report_tier, [], dict(USAGE)))
    events.append(b"data: [DONE]\n\n")
    return events


def strip_plan():
    body = json.dumps({"model": "m", "stream": True}).encode()
    return plan_request("openai", b"POST", CHAT, read_body([JSON], body))


def feed(meter, pieces, complete=True) -> Usage:
    for piece in pieces:
        meter.feed(piece)
    meter.flush()
    return meter.finish(complete)


def test_a_chat_stream_reads_the_tier_of_its_usage_chunk():
    events = chat_chunks([" a", " b"], ["flex"], "flex")
    for meter in (OpenAIStreamMeter(), meter_for(strip_plan(), "openai", CHAT, 200, SSE)):
        usage = feed(meter, events)
        assert (usage.source, usage.prompt_tokens, usage.service_tier) == ("provider", 12, "flex")
    # a usage chunk that names none takes the stream's first chunk's
    assert feed(OpenAIStreamMeter(), chat_chunks([" a"], ["priority"], ...)).service_tier == (
        "priority"
    )
    # a stream cut before its report: the estimate keeps it
    cut = chat_chunks([" a", " b"], ["scale"], usage=False)[:-1]
    usage = feed(OpenAIStreamMeter(), cut, complete=False)
    assert (usage.source, usage.completion_tokens, usage.service_tier) == ("estimated", 2, "scale")
    assert feed(OpenAIStreamMeter(), chat_chunks([" a"], [...], ...)).service_tier is None


def test_stream_decoys_never_yield_a_tier():
    decoys = [
        # a nested key, text holding the key, a value spelling it
        b'data: {"id":"c","choices":[{"delta":{"service_tier":"flex"}}]}\n\n',
        b'data: {"id":"c","x":{"service_tier":"flex"},"choices":[]}\n\n',
        b'data: {"id":"c","choices":[{"delta":{"content":"\\"service_tier\\":\\"flex\\""}}]}\n\n',
        b'data: {"id":"service_tier","note":"flex","choices":[]}\n\n',
        # a key that ends with the text (its quote escaped)
        b'data: {"a\\"service_tier":"flex","choices":[]}\n\n',
        b'data: {"a\\\\\\"service_tier": "flex","choices":[]}\n\n',
        b'data: {"id":"c","service_tier":"FLEX","choices":[]}\n\n',
        b'data: {"id":"c","service_tier":7,"choices":[]}\n\n',
        b'data: {"id":"c","service_tier":{"service_tier":"flex"},"choices":[]}\n\n',
        b'data: {"id":"c","service_tier":"' + b"x" * 33 + b'","choices":[]}\n\n',
        b'data: {"id":"c","service_tier":"fl\xc3\xa9","choices":[]}\n\n',
        # a comment or a field that is no data line
        b': {"service_tier":"flex"}\n\ndata: {"id":"c","choices":[]}\n\n',
        b'event: {"service_tier":"flex"}\ndata: {"id":"c","choices":[]}\n\n',
        # an event whose data is no object
        b'data: x\ndata: {"service_tier":"flex"}\n\n',
    ]
    report = sse({"id": "c", "choices": [], "usage": USAGE})
    for decoy in decoys:
        stream = decoy + report
        for pieces in ([stream], split_at(stream, [len(decoy) // 2]), [bytes([b]) for b in stream]):
            usage = feed(OpenAIStreamMeter(), pieces)
            assert usage.prompt_tokens == 12
            assert usage.service_tier is None, (decoy, pieces[:2])


def test_the_first_json_chunk_is_found_past_events_that_are_none():
    report = sse({"id": "c", "choices": [], "usage": USAGE})
    chunk = b'data: {"id":"c","service_tier":"flex","choices":[]}\n\n'
    for before in (
        b"data: hello\n\n",
        b"data\n\n",
        b": ping\n\nevent: x\nid: 1\n\n",
        b'data: ["service_tier"]\n\n',
    ):
        stream = before + chunk + report
        for pieces in ([stream], split_at(stream, [len(before)]), [bytes([b]) for b in stream]):
            assert feed(OpenAIStreamMeter(), pieces).service_tier == "flex", (before, pieces[:2])
    # a field that is no data line, in the chunk's event
    stream = b'datax: {"service_tier":"scale"}\n' + chunk + report
    for pieces in ([stream], [bytes([b]) for b in stream]):
        assert feed(OpenAIStreamMeter(), pieces).service_tier == "flex"


def responses_events(created_tier, completed_tier, kind="response.completed") -> list[bytes]:
    def event(name, doc) -> bytes:
        return f"event: {name}\ndata: ".encode() + compact(doc) + b"\n\n"

    response = {"id": "resp_1", "object": "response", "model": "gpt-4.1", "service_tier": None}
    created = {**response, "service_tier": created_tier, "status": "in_progress", "usage": None}
    done = {**response, "status": "completed", "output": [], "usage": {"input_tokens": 9}}
    done["usage"].update(output_tokens=2, total_tokens=11)
    if completed_tier is ...:
        del done["service_tier"]
    else:
        done["service_tier"] = completed_tier
    return [
        event("response.created", {"type": "response.created", "response": created}),
        event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        event(kind, {"type": kind, "sequence_number": 3, "response": done}),
    ]


def test_a_responses_stream_reads_the_tier_of_the_response_it_completes():
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        events = responses_events("auto", "priority", kind)
        for pieces in (events, [b"".join(events)], [bytes([b]) for b in b"".join(events)]):
            usage = feed(OpenAIStreamMeter(), pieces)
            assert (usage.prompt_tokens, usage.service_tier) == (9, "priority")
    # the tier asked for (response.created's "auto") is not the one that served it
    for completed in (None, ...):
        assert feed(OpenAIStreamMeter(), responses_events("auto", completed)).service_tier is None


def test_a_legacy_completions_stream_reads_its_tier():
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    events = [
        sse({**head, "service_tier": "default", "choices": [{"text": "Hi", "index": 0}]}),
        sse({**head, "service_tier": "default", "choices": [], "usage": USAGE}),
    ]
    meter = meter_for(strip_plan(), "openai", "/v1/completions", 200, SSE)
    assert feed(meter, events).service_tier == "default"


@st.composite
def tiered_streams(draw):
    """A chat stream: each chunk names a tier (valid or hostile, the same
    or not, or none) among its first members, or a decoy; the usage chunk
    names one or not; compact or spaced; comments and event lines."""
    spaced = draw(st.booleans())
    sep = (", ", ": ") if spaced else (",", ":")
    values = st.one_of(st.just(...), _TIERS, st.sampled_from([None, 7, "FLEX", "x" * 40, "é"]))
    events, docs = [], []
    for _ in range(draw(st.integers(0, 6))):
        doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
        tier = draw(values)
        if tier is not ...:
            doc["service_tier"] = tier
        doc["choices"] = [{"index": 0, "delta": {"content": draw(_TEXT)}}]
        if draw(st.integers(0, 4)) == 0:
            doc["choices"][0]["delta"]["service_tier"] = draw(_TIERS)  # nested: a decoy
        docs.append(doc)
        prefix = draw(st.sampled_from(["", ": keep-alive\n\n", "event: chunk\n", "id: 7\n"]))
        events.append(prefix.encode() + b"data: " + json.dumps(doc, separators=sep).encode())
        events[-1] += b"\n\n"
    report = {"id": "chatcmpl-1", "model": "gpt-4o", "choices": [], "usage": USAGE}
    tier = draw(values)
    if tier is not ...:
        report = {"service_tier": tier, **report}
    has_report = draw(st.booleans())
    if has_report:
        events.append(b"data: " + json.dumps(report, separators=sep).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    # the reference: the report's tier, else the first chunk's (its top-level member)
    expected = service_tier_of(report.get("service_tier")) if has_report else None
    if expected is None and docs:
        expected = service_tier_of(docs[0].get("service_tier"))
    return b"".join(events), expected, has_report


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=tiered_streams(),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    strip=st.booleans(),
)
def test_any_split_of_a_stream_reads_the_same_tier(stream, cuts, strip):
    data, expected, has_report = stream
    whole = feed(OpenAIStreamMeter(strip), [data], complete=has_report)
    pieces = split_at(data, cuts)
    split = feed(OpenAIStreamMeter(strip), pieces, complete=has_report)
    assert whole.service_tier == split.service_tier == expected
    assert whole == split
    assert whole.source == ("provider" if has_report else "estimated")


# --- Anthropic ----------------------------------------------------------------------


def test_an_anthropic_answer_reads_its_tier_and_web_searches():
    usage = {
        "input_tokens": 10,
        "output_tokens": 5,
        "cache_read_input_tokens": 0,
        "server_tool_use": {"web_search_requests": 3},
        "service_tier": "priority",
    }
    doc = {"id": "msg_1", "model": "claude-sonnet-4-5", "content": [], "usage": usage}
    for body in (compact(doc), json.dumps(doc).encode()):
        got = read_json(body, "anthropic")
        assert (got.service_tier, got.web_search_requests, got.prompt_tokens) == ("priority", 3, 10)
    # a top-level service_tier is not Anthropic's
    got = read_json(
        compact({**doc, "usage": {"input_tokens": 1}, "service_tier": "x"}), "anthropic"
    )
    assert (got.service_tier, got.web_search_requests) == (None, None)


def test_anthropic_hostile_values_are_none():
    for tier in (None, 7, "Standard", "x" * 33, "", ["standard"], {"a": 1}, "\ud800"):
        for searches in (-1, "3", 1.5, True, None, [], float("inf"), 2**70):
            usage = {"input_tokens": 1, "output_tokens": 1, "service_tier": tier}
            usage["server_tool_use"] = {"web_search_requests": searches}
            got = anthropic_usage(usage)
            assert got.service_tier is None
            assert got.web_search_requests == (2**70 if searches == 2**70 else None)
    assert anthropic_usage({"input_tokens": 1, "server_tool_use": [3]}).web_search_requests is None
    assert anthropic_usage({"input_tokens": 1, "server_tool_use": {}}).web_search_requests is None
    assert anthropic_usage(
        {"input_tokens": 1, "server_tool_use": {"web_search_requests": 2.0}}
    ) == (Usage(1, None, None, None, None, "provider", web_search_requests=2))
    # a tier alone is no report
    assert anthropic_usage({"service_tier": "standard"}) is None


def anthropic_events(start_usage: dict, delta_usage: dict | None, text="Hello") -> list[bytes]:
    def event(name, doc) -> bytes:
        return f"event: {name}\ndata: ".encode() + compact(doc) + b"\n\n"

    message = {"id": "msg_1", "type": "message", "model": "claude", "usage": start_usage}
    events = [
        event("message_start", {"type": "message_start", "message": message}),
        event(
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}},
        ),
    ]
    if delta_usage is not None:
        events.append(event("message_delta", {"type": "message_delta", "usage": delta_usage}))
    events.append(event("message_stop", {"type": "message_stop"}))
    return events


def test_an_anthropic_stream_takes_the_last_reported_tier_and_searches():
    start = {"input_tokens": 10, "output_tokens": 1, "service_tier": "standard"}
    start["server_tool_use"] = {"web_search_requests": 0}
    delta = {"output_tokens": 7, "server_tool_use": {"web_search_requests": 2}}
    usage = feed(AnthropicStreamMeter(), anthropic_events(start, delta))
    assert (usage.source, usage.service_tier, usage.web_search_requests) == (
        "provider",
        "standard",
        2,
    )
    later = {**delta, "service_tier": "priority"}
    usage = feed(AnthropicStreamMeter(), anthropic_events(start, later))
    assert (usage.service_tier, usage.completion_tokens) == ("priority", 7)
    # a hostile later value does not undo a good one
    bad = {**delta, "service_tier": "PRIORITY", "server_tool_use": {"web_search_requests": -4}}
    usage = feed(AnthropicStreamMeter(), anthropic_events(start, bad))
    assert (usage.service_tier, usage.web_search_requests) == ("standard", 0)
    # cut before message_delta: the estimate keeps what message_start said
    usage = feed(AnthropicStreamMeter(), anthropic_events(start, None)[:2], complete=False)
    assert (usage.source, usage.service_tier, usage.web_search_requests) == (
        "estimated",
        "standard",
        0,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start_tier=st.one_of(st.none(), _TIERS, st.just("BAD")),
    delta_tier=st.one_of(st.none(), _TIERS, st.just(7)),
    start_searches=st.one_of(st.none(), st.integers(0, 9)),
    delta_searches=st.one_of(st.none(), st.integers(-2, 9), st.just("4")),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_any_split_of_an_anthropic_stream_reads_the_same(
    start_tier, delta_tier, start_searches, delta_searches, cuts
):
    start = {"input_tokens": 10, "output_tokens": 1}
    delta = {"output_tokens": 7}
    for usage, tier, searches in (
        (start, start_tier, start_searches),
        (delta, delta_tier, delta_searches),
    ):
        if tier is not None:
            usage["service_tier"] = tier
        if searches is not None:
            usage["server_tool_use"] = {"web_search_requests": searches}
    data = b"".join(anthropic_events(start, delta))
    got = feed(AnthropicStreamMeter(), split_at(data, cuts))
    # the reference: the last valid value reported
    tiers = [service_tier_of(u.get("service_tier")) for u in (start, delta)]
    counts = [s if type(s) is int and s >= 0 else None for s in (start_searches, delta_searches)]
    assert got.service_tier == (tiers[1] or tiers[0])
    assert got.web_search_requests == (counts[1] if counts[1] is not None else counts[0])
    assert got.prompt_tokens == 10 and got.completion_tokens == 7


def test_other_meters_report_no_tier():
    assert NO_USAGE.service_tier is None and NO_USAGE.web_search_requests is None
    embeddings = compact({"object": "list", "data": [], "model": "m", "usage": USAGE})
    assert read_json(embeddings).service_tier is None
