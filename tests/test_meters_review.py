"""Review of the usage meters beyond the OpenAI chat stripping path: legacy
completions streams, multi-line SSE data fields, Anthropic's thinking-token
breakdown. Each stream is fed in every generated split of its bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.providers.base import NO_OPTIONS
from lectr.providers.body import read_body
from lectr.providers.catalogue.azure import Azure
from lectr.providers.catalogue.openai import OpenAI
from lectr.providers.catalogue.together import Together
from lectr.providers.custom import CustomProvider
from lectr.usage.meters import anthropic_usage, meter_for, plan_request
from lectr.usage.model import Usage
from tests.support.fake_provider import openai_completions_stream
from tests.test_meters import run, split_at

SSE = b"text/event-stream"
JSON = b"application/json"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = "/v1/messages"

cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


def plan(dialect: str, path: str, body: dict):
    return plan_request(dialect, b"POST", path, read_body([JSON], json.dumps(body).encode()))


feed = run  # (test_meters': every piece through the meter, then its usage)


def dumps(doc: dict, spaced: bool) -> str:
    return json.dumps(doc) if spaced else json.dumps(doc, separators=(",", ":"))


# --- legacy completions: a stream without a usage report ---------------------------


def _completions_stream(
    words: list[str], spaced: bool, nl: str, include_usage: bool = False
) -> bytes:
    events = openai_completions_stream(
        "gpt-3.5-turbo-instruct", words, include_usage, spaced=spaced, nl=nl
    )
    return b"".join(events)


@settings(max_examples=150, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["Hel", "lo", " wor", "ld", "!", '"q"']), min_size=1, max_size=8
    ),
    spaced=st.booleans(),
    crlf=st.booleans(),
    points=cuts,
)
def test_a_legacy_completions_stream_without_usage_is_estimated_from_its_text(
    words, spaced, crlf, points
):
    # /v1/completions is not asked for its usage: a stream the client did not
    # ask usage for ends without a report, and is estimated as a chat stream
    # is, one completion token per text chunk - not 0 for text delivered.
    p = plan(
        "openai", COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True}
    )
    data = _completions_stream(words, spaced, "\r\n" if crlf else "\n")
    out, usage = feed(meter_for(p, "openai", COMPLETIONS, 200, SSE), split_at(data, points))
    assert out == data
    assert usage.source == "estimated"
    assert usage.completion_tokens == len(words)
    assert usage.model == "gpt-3.5-turbo-instruct"


LEGACY = read_body(
    [JSON],
    json.dumps({"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True}).encode(),
)


@settings(max_examples=150, deadline=None)
@given(
    words=st.lists(
        st.sampled_from(["Hel", "lo", " wor", "ld", "!", '"q"', "usage"]), min_size=1, max_size=8
    ),
    spaced=st.booleans(),
    crlf=st.booleans(),
    points=cuts,
)
def test_openai_asks_a_legacy_completions_stream_for_its_usage_and_strips_it(
    words, spaced, crlf, points
):
    # OpenAI's completions API takes stream_options as chat does: Lectr asks,
    # records the provider's exact report, and the client gets the stream it
    # would have had without the request, whatever the reads
    p = OpenAI().plan(b"POST", COMPLETIONS, LEGACY, None, NO_OPTIONS)
    assert json.loads(p.body)["stream_options"] == {"include_usage": True}
    assert p.strip_usage_chunk
    nl = "\r\n" if crlf else "\n"
    data = _completions_stream(words, spaced, nl, include_usage=True)
    out, usage = feed(meter_for(p, "openai", COMPLETIONS, 200, SSE), split_at(data, points))
    assert out == _completions_stream(words, spaced, nl)
    n = len(words)
    assert usage == Usage(7, n, 7 + n, None, None, "provider", model="gpt-3.5-turbo-instruct")


@pytest.mark.parametrize(
    "provider",
    [
        Together(),
        Azure(),
        CustomProvider(
            "vllm",
            display_name="vLLM",
            dialect="openai",
            base_url="http://10.0.0.1:8000",
            auth="bearer",
        ),
    ],
    ids=["together", "azure", "custom"],
)
def test_only_openai_itself_is_asked_for_a_legacy_completions_streams_usage(provider):
    # (the other OpenAI-dialect APIs are asked on chat at most: whether they
    # accept stream_options on /v1/completions is not documented)
    p = provider.plan(b"POST", COMPLETIONS, LEGACY, None, NO_OPTIONS)
    assert (p.body or LEGACY.body) == LEGACY.body and not p.strip_usage_chunk


def test_a_chat_stream_estimate_does_not_count_text_members():
    # (the legacy count is for /v1/completions only: a chat chunk's "text" is
    # not an answer delta)
    p = plan("openai", CHAT, {"model": "m", "messages": [], "stream": True})
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    other = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}}], "text": "x"}
    data = f"data: {dumps(chunk, False)}\n\ndata: {dumps(other, False)}\n\n".encode()
    _, usage = feed(meter_for(p, "openai", CHAT, 200, SSE), [data])
    assert (usage.source, usage.completion_tokens) == ("estimated", 1)


# --- multi-line data fields --------------------------------------------------------

USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 10,
    "total_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 4},
}


def _chat_with_multiline_usage(spaced: bool, crlf: bool) -> bytes:
    nl = "\r\n" if crlf else "\n"
    first = {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    head = dumps({"id": "c", "model": "gpt-4o", "choices": []}, spaced)[:-1] + ","
    tail = dumps({"usage": USAGE}, spaced)[1:]
    return (
        f"data: {dumps(first, spaced)}{nl}{nl}"
        f"data: {head}{nl}data: {tail}{nl}{nl}"  # one event, its JSON on two data lines
        f"data: [DONE]{nl}{nl}"
    ).encode()


@settings(max_examples=150, deadline=None)
@given(spaced=st.booleans(), crlf=st.booleans(), points=cuts, asked=st.booleans())
def test_a_usage_report_on_two_data_lines_is_read_whatever_the_reads(spaced, crlf, points, asked):
    # SSE joins an event's data lines with "\n": the report is the event's
    # whole data, not its last line, however the bytes arrive.
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    p = plan("openai", CHAT, body)
    data = _chat_with_multiline_usage(spaced, crlf)
    out, usage = feed(meter_for(p, "openai", CHAT, 200, SSE), split_at(data, points))
    assert out == data  # (not the usage-only chunk OpenAI sends: forwarded as it is)
    assert usage.source == "provider"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (20, 10, 30)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (8, 4)


@settings(max_examples=100, deadline=None)
@given(spaced=st.booleans(), points=cuts)
def test_a_data_line_that_is_not_its_events_whole_data_is_no_report(spaced, points):
    # an event whose data is "1\n{...usage...}" is not JSON: no report, as a
    # byte-at-a-time read decides too
    p = plan(
        "openai",
        CHAT,
        {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
    )
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    report = {"id": "c", "model": "m", "choices": [], "usage": USAGE}
    data = (f"data: {dumps(chunk, spaced)}\n\ndata: 1\ndata: {dumps(report, spaced)}\n\n").encode()
    _, usage = feed(meter_for(p, "openai", CHAT, 200, SSE), split_at(data, points))
    _, bytewise = feed(
        meter_for(p, "openai", CHAT, 200, SSE), [data[i : i + 1] for i in range(len(data))]
    )
    assert usage == bytewise
    assert usage.source == "estimated"


# --- Anthropic: thinking tokens ----------------------------------------------------

counts = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=200, deadline=None)
@given(inp=counts, out=counts, thinking=counts)
def test_anthropic_thinking_tokens_are_the_reasoning_tokens(inp, out, thinking):
    # Anthropic's output_tokens_details.thinking_tokens: the part of
    # output_tokens spent on reasoning (what reasoning_tokens means)
    thinking = min(thinking, out)
    usage = anthropic_usage(
        {
            "input_tokens": inp,
            "output_tokens": out,
            "output_tokens_details": {"thinking_tokens": thinking},
        },
        "claude-x",
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (inp, out)
    assert usage.reasoning_tokens == thinking


def _anthropic_stream(
    thinking_start: int | None, thinking_end: int, crlf: bool, names: bool
) -> bytes:
    nl = "\r\n" if crlf else "\n"
    start_usage = {"input_tokens": 12, "cache_read_input_tokens": 100, "output_tokens": 1}
    if thinking_start is not None:
        start_usage["output_tokens_details"] = {"thinking_tokens": thinking_start}
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "m",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-x",
                    "content": [],
                    "stop_reason": None,
                    "usage": start_usage,
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me see"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "output_tokens": 300,
                    "output_tokens_details": {"thinking_tokens": thinking_end},
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    text = ""
    for name, doc in events:
        if names:
            text += f"event: {name}{nl}"
        text += f"data: {json.dumps(doc)}{nl}{nl}"
    return text.encode()


@settings(max_examples=150, deadline=None)
@given(
    thinking_start=st.none() | st.integers(min_value=0, max_value=1),
    thinking_end=st.integers(min_value=0, max_value=300),
    crlf=st.booleans(),
    names=st.booleans(),
    points=cuts,
)
def test_anthropic_stream_thinking_tokens_are_the_reasoning_tokens(
    thinking_start, thinking_end, crlf, names, points
):
    p = plan("anthropic", MESSAGES, {"model": "claude-x", "messages": [], "stream": True})
    data = _anthropic_stream(thinking_start, thinking_end, crlf, names)
    out, usage = feed(meter_for(p, "anthropic", MESSAGES, 200, SSE), split_at(data, points))
    assert out == data
    assert usage.source == "provider"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (112, 300, 100)
    assert usage.reasoning_tokens == thinking_end  # message_delta's cumulative count wins


def test_anthropic_json_thinking_tokens_are_the_reasoning_tokens():
    p = plan("anthropic", MESSAGES, {"model": "claude-x", "messages": []})
    body = json.dumps(
        {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "ok"},
            ],
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 5,
                "output_tokens": 80,
                "output_tokens_details": {"thinking_tokens": 70},
            },
        }
    ).encode()
    _, usage = feed(meter_for(p, "anthropic", MESSAGES, 200, JSON), [body])
    assert (usage.source, usage.completion_tokens, usage.reasoning_tokens) == ("provider", 80, 70)


# --- reasoning deltas of OpenAI-dialect providers ----------------------------------


def _reasoning_chunk(kind: str, text: str) -> dict:
    delta = {
        # DeepSeek, xAI, vLLM: reasoning_content; OpenRouter, Groq: reasoning
        "deepseek": {"content": None, "reasoning_content": text},
        "openrouter": {"content": "", "reasoning": text},
        "answer": {"content": text, "reasoning_content": None, "reasoning": None},
    }[kind]
    return {"id": "c", "model": "deepseek-reasoner", "choices": [{"index": 0, "delta": delta}]}


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.sampled_from(["deepseek", "openrouter", "answer"]),
            st.sampled_from(["Hm", "", 'a "b"']),
        ),
        max_size=30,
    ),
    spaced=st.booleans(),
    strip=st.booleans(),
    points=cuts,
)
def test_a_cut_reasoning_stream_counts_its_reasoning_deltas(chunks, spaced, strip, points):
    # a reasoning model's stream cut while it reasons (the client left) is
    # estimated from the output it had streamed: its reasoning deltas are
    # output tokens, billed as such - not 0
    body = {"model": "deepseek-reasoner", "messages": [], "stream": True}
    if not strip:
        body["stream_options"] = {"include_usage": True}
    p = plan("openai", CHAT, body)
    docs = [_reasoning_chunk(kind, text) for kind, text in chunks]
    data = "".join(f"data: {dumps(d, spaced)}\n\n" for d in docs).encode()
    out, usage = feed(meter_for(p, "openai", CHAT, 200, SSE), split_at(data, points))
    assert out == data
    if data:
        assert usage.source == "estimated"
        assert usage.completion_tokens == sum(1 for _, text in chunks if text)


@settings(max_examples=100, deadline=None)
@given(
    reasoning=st.integers(min_value=1, max_value=4000),
    key=st.sampled_from(["reasoning_content", "reasoning"]),
)
def test_a_cut_reasoning_json_answer_counts_its_reasoning_text(reasoning, key):
    # a JSON answer cut short inside its reasoning text: the reasoning it had
    # delivered counts, as Anthropic's thinking does
    p = plan("openai", CHAT, {"model": "deepseek-reasoner", "messages": []})
    doc = {
        "id": "c",
        "model": "deepseek-reasoner",
        "choices": [
            {"index": 0, "message": {"role": "assistant", key: "r" * 8000, "content": "x"}}
        ],
    }
    body = json.dumps(doc).encode()
    cut = body[: body.index(b"rrrr") + reasoning]
    meter = meter_for(p, "openai", CHAT, 200, JSON)
    meter.feed(cut)
    usage = meter.finish(False)
    assert usage.source == "estimated"
    assert usage.completion_tokens == -(-reasoning // 4)


@settings(max_examples=60, deadline=None)
@given(crlf=st.booleans(), names=st.booleans(), points=cuts)
def test_anthropic_thinking_count_belongs_to_the_output_count_it_breaks_down(crlf, names, points):
    # message_start's breakdown (0 thinking tokens so far) is not the answer's:
    # a message_delta whose output count comes without one leaves it unknown,
    # and so does a stream cut before message_delta (its output is estimated)
    p = plan("anthropic", MESSAGES, {"model": "claude-x", "messages": [], "stream": True})
    data = _anthropic_stream(0, 250, crlf, names)
    no_breakdown = data.replace(b', "output_tokens_details": {"thinking_tokens": 250}', b"")
    assert no_breakdown != data
    _, usage = feed(meter_for(p, "anthropic", MESSAGES, 200, SSE), split_at(no_breakdown, points))
    assert (usage.source, usage.completion_tokens, usage.reasoning_tokens) == (
        "provider",
        300,
        None,
    )
    cut = data[: data.index(b"message_delta") - 1]
    _, usage = feed(meter_for(p, "anthropic", MESSAGES, 200, SSE), split_at(cut, points))
    assert usage.source == "estimated" and usage.completion_tokens == 3  # "Let me see": 10 bytes
    assert usage.reasoning_tokens is None
