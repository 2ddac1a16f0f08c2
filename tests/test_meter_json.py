"""The JSON meter's fast path (``_top_level_report``), the
answers it cannot read whole (``_cut_json``, ``_report_in_tail``), the
Anthropic stream meter under any split, and the strict request reader
(``parse_json``).

The reference a whole JSON answer is held to is the meter's own slow path
(``JsonMeter._read``): ``json.loads`` of the body, then ``openai_usage`` /
``anthropic_usage`` of its ``usage`` and ``model`` members.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.providers.body import BodyRefused, parse_json
from lectr.usage.meters import (
    JSON_FULL_PARSE_MAX,
    JSON_TAIL_BYTES,
    AnthropicStreamMeter,
    JsonMeter,
    _top_level_report,
    anthropic_usage,
    openai_usage,
)
from lectr.usage.model import NO_USAGE, RAW_USAGE_MAX, Usage
from tests.test_meters import split_at

# --- helpers ------------------------------------------------------------------------


def run(meter, pieces: list[bytes], complete: bool = True) -> Usage:
    for piece in pieces:
        assert meter.feed(piece) is piece  # never changed, never delayed
    return meter.finish(complete)


def reference(body: bytes, kind: str) -> Usage:
    """What the meter's slow path reads from a whole, valid JSON answer."""
    doc = json.loads(body)
    assert isinstance(doc, dict)
    if kind == "anthropic":
        return anthropic_usage(doc.get("usage"), doc.get("model")) or NO_USAGE
    # (the tier is a top-level member of an OpenAI answer)
    return (
        openai_usage(doc.get("usage"), doc.get("model"), None, doc.get("service_tier")) or NO_USAGE
    )


def same_raw(got: str | None, expected: str | None) -> bool:
    """The raw usage text: the same object (the fast path keeps the
    provider's own spelling of numbers, the slow path re-serialises)."""
    if got is None or expected is None:
        return got is expected
    if len(got) >= RAW_USAGE_MAX or len(expected) >= RAW_USAGE_MAX:
        return got[:64] == expected[:64]
    return json.loads(got) == json.loads(expected)


def assert_same(got: Usage, expected: Usage) -> None:
    assert got == expected
    assert got.model == expected.model
    assert same_raw(got.raw, expected.raw), (got.raw, expected.raw)


# --- generated JSON answers (written by hand: any whitespace, any escapes) ----------

_DECOY_TEXT = st.lists(
    st.sampled_from(
        [
            '"usage":{"prompt_tokens":7}',
            '"usage": {"input_tokens": 9}',
            '"model":"fake-model"',
            "usage",
            "model",
            "\\",
            '"',
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "é",
            "\U0001f600",
            "\n",
            " ",
            "a",
            "\\u0022",
        ]
    ),
    max_size=8,
).map("".join)
_TEXT = st.one_of(_DECOY_TEXT, st.text(max_size=12))


@st.composite
def json_string(draw, text=_TEXT) -> str:
    """A JSON string literal of ``text``, escaped in one of the ways JSON allows."""
    s = draw(text)
    style = draw(st.sampled_from(["plain", "ascii", "slash", "u-all"]))
    if style == "plain":
        return json.dumps(s, ensure_ascii=False)
    if style == "ascii":
        return json.dumps(s)
    if style == "slash":
        return json.dumps(s, ensure_ascii=False).replace("/", "\\/")
    return (
        '"'
        + "".join(json.dumps(c)[1:-1] if ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in s)
        + '"'
    )


_NUMBER = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["0", "-0", "5.0", "1E2", "1.0e+2", "2e-3", "12.50", "1e400", "-1", "3"]),
)
_SCALAR = st.one_of(_NUMBER, st.sampled_from(["true", "false", "null"]), json_string())
_COUNT_VALUE = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    _NUMBER,
    st.sampled_from(["null", "true", "false", '"5"', "[]", "{}"]),
)
_COUNT_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
]


# a JSON value as a tree, rendered later with any whitespace:
# ("s", text) | ("a", [tree]) | ("o", [(key_text, tree)])
@st.composite
def counts(draw):
    keys = draw(st.lists(st.sampled_from(_COUNT_KEYS), unique=True, max_size=4))
    members = [(json.dumps(k), ("s", draw(_COUNT_VALUE))) for k in keys]
    if draw(st.booleans()):
        details = draw(st.sampled_from(["prompt_tokens_details", "completion_tokens_details"]))
        inner = (
            "o",
            [
                ('"cached_tokens"', ("s", draw(_COUNT_VALUE))),
                ('"reasoning_tokens"', ("s", draw(_COUNT_VALUE))),
            ],
        )
        members.append((json.dumps(details), inner))
    if draw(st.booleans()):
        split = (
            "o",
            [
                ('"ephemeral_5m_input_tokens"', ("s", draw(_COUNT_VALUE))),
                ('"ephemeral_1h_input_tokens"', ("s", draw(_COUNT_VALUE))),
            ],
        )
        members.append(('"cache_creation"', split))
    return ("o", members)


_NESTED_KEY = st.one_of(
    st.sampled_from(['"usage"', '"model"', '"content"', '"text"', '"a"', '"us\\u0061ge"']),
    json_string(),
)
_TREE = st.recursive(
    _SCALAR.map(lambda t: ("s", t)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: ("a", items)),
        st.lists(st.tuples(_NESTED_KEY, inner), max_size=3).map(lambda m: ("o", m)),
        counts().map(lambda c: ("o", [('"usage"', c)])),  # a nested decoy report
        st.tuples(json_string(), counts()).map(
            lambda t: ("o", [('"model"', ("s", t[0])), ('"usage"', t[1])])
        ),
    ),
    max_leaves=10,
)
_WS = ["", "", "", " ", "\n", "\t", "\r\n", "  \n  "]


def render(tree, rnd: random.Random) -> str:
    def w() -> str:
        return rnd.choice(_WS)

    kind, value = tree
    if kind == "s":
        return value
    if kind == "a":
        if not value:
            return "[" + w() + "]"
        return "[" + w() + (w() + "," + w()).join(render(v, rnd) for v in value) + w() + "]"
    if not value:
        return "{" + w() + "}"
    members = (k + w() + ":" + w() + render(v, rnd) for k, v in value)
    return "{" + w() + (w() + "," + w()).join(members) + w() + "}"


_MODEL_VALUE = st.one_of(
    st.from_regex(r"[a-z0-9.:/-]{1,30}", fullmatch=True).map(json.dumps),
    st.from_regex(r"[a-z0-9.:/-]{1,30}", fullmatch=True).map(json.dumps),
    st.sampled_from(['"gpt-4o-2024-08-06"', '"claude-sonnet-4-5"', '""', '"m"', "null", "7"]),
    json_string(st.text(min_size=1, max_size=20)),
    st.just(json.dumps("m" * 300)),
)
_USAGE_VALUE = st.one_of(
    counts(), st.sampled_from(["null", '"usage"', "1", "[]"]).map(lambda t: ("s", t))
)
_OTHER_KEYS = ["id", "object", "choices", "content", "x", "metadata", "service_tier", "note"]


@st.composite
def answers(draw) -> bytes:
    """A JSON answer object: unique, plainly spelled top-level keys (what
    every provider sends); a usage and a model member or not, anywhere;
    decoys nested anywhere; any whitespace; escapes in every string that is
    not a top-level key."""
    members = []
    for key in draw(st.lists(st.sampled_from(_OTHER_KEYS), unique=True, max_size=4)):
        members.append((json.dumps(key), draw(st.one_of(_SCALAR.map(lambda t: ("s", t)), _TREE))))
    usage = model = None
    if draw(st.integers(0, 9)):
        usage = ('"usage"', draw(_USAGE_VALUE))
    if draw(st.booleans()):
        model = ('"model"', ("s", draw(_MODEL_VALUE)))
    if draw(st.booleans()):
        # shaped as providers send it: scalars and the model, the bulky
        # members (decoys inside), the usage, scalars
        scalars = [m for m in members if m[1][0] == "s"]
        bulky = [m for m in members if m[1][0] != "s"]
        cut = draw(st.integers(0, len(scalars)))
        head = scalars[:cut] + ([model] if model else [])
        members = head + bulky + ([usage] if usage else []) + scalars[cut:]
    else:
        members = draw(st.permutations(members + [m for m in (usage, model) if m]))
    rnd = draw(st.randoms(use_true_random=False))
    text = rnd.choice(_WS) + render(("o", list(members)), rnd) + rnd.choice(_WS)
    return text.encode("utf-8")


# --- the fast path against the full parse -------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=answers(),
    kind=st.sampled_from(["openai", "anthropic"]),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_the_fast_path_reads_what_a_full_parse_reads(body, kind, cuts):
    """For any whole answer the meter reads (split into any reads) what the
    full parse reads; when the fast path answers at all, its usage object
    and model are exactly the top-level ones."""
    doc = json.loads(body)
    fast = _top_level_report(body, False)
    if fast is not None:
        usage, model, raw, _ = fast
        assert usage == doc.get("usage")  # never a nested one
        assert model == (openai_usage({"total_tokens": 0}, doc.get("model")).model)
        if raw is not None:
            assert json.loads(raw) == usage
    assert_same(run(JsonMeter(kind), split_at(body, cuts)), reference(body, kind))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(_TREE, max_size=3),
    after=st.lists(_TREE, max_size=3),
    usage=counts(),
    trailing=st.lists(
        st.tuples(st.sampled_from(["service_tier", "system_fingerprint", "x"]), _SCALAR),
        unique_by=lambda t: t[0],
        max_size=2,
    ),
    size=st.integers(min_value=JSON_FULL_PARSE_MAX - 2000, max_value=3 * JSON_FULL_PARSE_MAX),
    kind=st.sampled_from(["openai", "anthropic"]),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    seed=st.randoms(use_true_random=False),
)
def test_large_answers_read_the_top_level_usage(
    before, after, usage, trailing, size, kind, cuts, seed
):
    """An answer larger than what is parsed whole, shaped as every metered
    response is (model first, bulky content with decoys, then usage, then
    scalar members): the same counts and model as a full parse."""
    content = ("a", [*before, ("s", json.dumps("x" * size)), *after])
    members = [('"model"', ("s", '"gpt-4o"')), ('"content"', content), ('"usage"', usage)]
    members += [(json.dumps(k), ("s", v)) for k, v in trailing]
    body = render(("o", members), seed).encode("utf-8")
    got = run(JsonMeter(kind), split_at(body, cuts))
    expected = reference(body, kind)
    assert got == expected and got.model == expected.model


# --- top-level members as a full parse reads them, and cut answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "what"),
    [
        # duplicate top-level "usage", the last one not an object: the fast
        # path takes the earlier object, a full parse (and Python clients) null
        (b'{"model":"m","usage":{"prompt_tokens":5},"usage":null}', "usage"),
        # a top-level model key written with an escape: the fast path sees no model
        (b'{"mod\\u0065l":"gpt-4o","usage":{"prompt_tokens":5}}', "model"),
        # a key ending in an escaped quote and "usage": taken for the usage key
        (b'{"model":"m","usage":{"prompt_tokens":5},"a\\"usage":{"prompt_tokens":999}}', "usage"),
        # the same for the model key
        (b'{"a\\"model":"fake","model":"m","usage":{"prompt_tokens":5}}', "model"),
    ],
)
def test_the_fast_path_reads_top_level_members_as_a_full_parse_does(body, what):
    expected = reference(body, "openai")
    got = run(JsonMeter("openai"), [body])
    assert (got, got.model) == (expected, expected.model), what


def _anthropic_doc(content: list, usage: dict | None) -> dict:
    doc = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": "tool_use",
        "stop_sequence": None,
    }
    if usage is not None:
        doc["usage"] = usage
    return doc


_DECOY_TOOL = {
    "type": "tool_use",
    "id": "toolu_1",
    "name": "record_stats",
    "input": {"usage": {"input_tokens": 0, "output_tokens": 0}},
}


def test_an_answer_cut_right_after_a_nested_usage_is_not_a_provider_report():
    """A connection cut just after a tool input whose last member is a
    ``usage`` object: the body ends with ``}`` and what follows the nested
    object is one ``}``, as in a whole answer - told cut, the meter never
    takes the model-written tool input for Anthropic's report (0 tokens)."""
    doc = _anthropic_doc([_DECOY_TOOL], {"input_tokens": 5000, "output_tokens": 900})
    body = json.dumps(doc, separators=(",", ":")).encode()
    cut = body[
        : body.index(b'"input":{"usage":')
        + len(b'"input":{"usage":{"input_tokens":0,"output_tokens":0}}')
    ]
    assert cut.endswith(b"}}")
    usage = run(JsonMeter("anthropic"), [cut], complete=False)
    assert usage.source == "estimated", usage


def test_a_large_cut_answer_never_takes_a_nested_usage_for_the_report():
    """A large answer (tail window only) cut before its top-level usage: the
    last whole ``"usage": {…}`` in the tail is a tool input's, never taken
    for the provider's report."""
    big = {
        "type": "tool_use",
        "id": "toolu_2",
        "name": "write_file",
        "input": {"path": "a.txt", "text": "z" * (400 * 1024)},
    }
    doc = _anthropic_doc(
        [{"type": "text", "text": "y" * (200 * 1024)}, _DECOY_TOOL, big],
        {"input_tokens": 5000, "output_tokens": 120_000},
    )
    body = json.dumps(doc).encode()
    cut = body[: body.index(b"zzzz") + 150 * 1024]  # cut inside the second tool's input
    assert len(cut) > JSON_FULL_PARSE_MAX
    assert len(cut) - cut.index(b'"usage"') < JSON_TAIL_BYTES  # the decoy is in the tail
    pieces = [cut[i : i + 16384] for i in range(0, len(cut), 16384)]
    usage = run(JsonMeter("anthropic"), pieces, complete=False)
    assert usage.source == "estimated", usage


def _chat_doc(content: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1000, "total_tokens": 1010},
    }


def test_an_answer_cut_inside_its_text_is_estimated_from_that_text():
    """docs/usage-accounting.md: "a JSON answer cut short counts one token per
    four bytes of the text it had delivered". Cut inside the content (where
    nearly every cut of a long answer falls), the 4,000 bytes delivered
    count: the string the cut ended is counted up to the cut."""
    body = json.dumps(_chat_doc("x" * 8000)).encode()
    cut = body[: body.index(b"xxxx") + 4000]
    usage = run(JsonMeter("openai"), [cut], complete=False)
    assert usage.source == "estimated"
    assert usage.completion_tokens == 1000, usage


def test_a_large_cut_answer_is_estimated_from_the_text_it_delivered():
    """The same cut in an answer larger than 256 KiB (only its head and a
    tail window kept): every byte of text it delivered counts, the string
    running from the head into the tail included."""
    body = json.dumps(_chat_doc("x" * (600 * 1024))).encode()
    cut = body[: body.index(b"xxxx") + 400 * 1024]
    usage = run(JsonMeter("openai"), [cut[i : i + 16384] for i in range(0, len(cut), 16384)], False)
    assert usage.source == "estimated"
    assert usage.completion_tokens == 400 * 1024 // 4, usage  # every byte of text it delivered


# --- Anthropic streams: any split, any spelling ------------------------------------


def _sse(rnd: random.Random, name: str, doc: dict, with_names: bool, spaced: bool, nl: str) -> str:
    data = json.dumps(doc) if spaced else json.dumps(doc, separators=(",", ":"))
    lines = []
    if with_names:
        lines.append(f"event:{rnd.choice(['', ' '])}{name}")
    if rnd.random() < 0.2 and spaced:  # the JSON split over two data lines
        head, _, tail = data.partition(", ")
        lines += [f"data: {head},", f"data: {tail}"] if tail else [f"data: {data}"]
    else:
        lines.append(f"data:{rnd.choice(['', ' '])}{data}")
    out = nl.join(lines) + nl + nl
    if rnd.random() < 0.2:
        out = f": keep-alive{nl}{nl}" + out
    return out


@settings(max_examples=300, deadline=None)
@given(
    seed=st.randoms(use_true_random=False),
    with_names=st.booleans(),
    spaced=st.booleans(),
    nl=st.sampled_from(["\n", "\r\n"]),
    start_usage=st.fixed_dictionaries(
        {"input_tokens": st.integers(0, 10**7), "output_tokens": st.integers(0, 5)},
        optional={
            "cache_read_input_tokens": st.integers(0, 10**6),
            "cache_creation_input_tokens": st.integers(0, 10**6),
            "cache_creation": st.fixed_dictionaries(
                {
                    "ephemeral_5m_input_tokens": st.integers(0, 1000),
                    "ephemeral_1h_input_tokens": st.integers(0, 1000),
                }
            ),
        },
    ),
    delta_usage=st.fixed_dictionaries(
        {"output_tokens": st.integers(0, 10**6)},
        optional={
            "input_tokens": st.integers(0, 10**7),
            "cache_read_input_tokens": st.integers(0, 10**6),
        },
    ),
    texts=st.lists(st.text(max_size=20), max_size=5),
    cut_at=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_anthropic_stream_any_split_any_spelling(
    seed, with_names, spaced, nl, start_usage, delta_usage, texts, cut_at, cuts
):
    """Whatever the reads, the spelling (event lines or not, CRLF, spaced
    JSON, data split over lines, comments) and the cut point, the usage is
    the one the whole stream read event by event gives."""
    rnd = seed
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-x",
                    "content": [],
                    "usage": start_usage,
                },
            },
        )
    ]
    events.append(
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    events.append(("ping", {"type": "ping"}))
    for t in texts:
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": t},
                },
            )
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage},
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    blocks = [_sse(rnd, n, d, with_names, spaced, nl).encode() for n, d in events]
    stream = b"".join(blocks)

    def whole(data: bytes) -> Usage:
        m = AnthropicStreamMeter()
        assert m.feed(data) == data
        return m.finish()

    expected = whole(stream)
    assert expected.source == "provider"
    got = run_split(stream, cuts)
    assert got == expected and got.model == expected.model == "claude-x"
    # cut anywhere: the same as the whole prefix fed at once
    prefix = stream[: cut_at % (len(stream) + 1)]
    got = run_split(prefix, cuts)
    ref = whole(prefix)
    assert got == ref and got.model == ref.model


def run_split(data: bytes, cuts: list[int]) -> Usage:
    m = AnthropicStreamMeter()
    out = b"".join(m.feed(p) for p in split_at(data, cuts))
    assert out == data
    return m.finish()


# --- parse_json: strict, exact, with the model's span --------------------------------

_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def request_bodies(draw) -> tuple[bytes, dict, bytes | None]:
    """A request object written with any JSON whitespace, escaped or not; the
    bytes of its model value as written."""
    keys = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["model", "stream", "messages", "x", "é"]), st.text(max_size=6)
            ),
            unique=True,
            max_size=5,
        )
    )
    doc = {k: draw(_VALUES) for k in keys}
    if "model" in doc and draw(st.booleans()):
        doc["model"] = draw(st.text(max_size=20))
    rnd = draw(st.randoms(use_true_random=False))
    ascii_ = draw(st.booleans())
    ws = [" ", "\t", "\n", "\r", ""]

    def w() -> str:
        return "".join(rnd.choice(ws) for _ in range(rnd.randint(0, 2)))

    members = [
        json.dumps(k, ensure_ascii=ascii_) + w() + ":" + w() + json.dumps(v, ensure_ascii=ascii_)
        for k, v in doc.items()
    ]
    text = w() + "{" + w() + (w() + "," + w()).join(members) + w() + "}" + w()
    model = None
    if "model" in doc:
        model = json.dumps(doc["model"], ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    return text.encode("utf-8", "surrogatepass"), doc, model


@settings(max_examples=800, deadline=None)
@given(request_bodies())
def test_parse_json_reads_what_json_loads_reads_and_spans_the_model(case):
    body, doc, model = case
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:  # lone surrogates in the text: refused as not UTF-8
        with pytest.raises(BodyRefused):
            parse_json(body)
        return
    got, span = parse_json(body)
    assert got == json.loads(body) == doc
    if model is None:
        assert span is None
    else:
        assert body[span[0] : span[1]] == model
        assert body[: span[0]].rstrip(b" \t\r\n").endswith(b":")
        assert body[span[1] :].lstrip(b" \t\r\n")[:1] in (b",", b"}")


def _top_level_duplicates(text: str) -> bool:
    seen: list[list] = []

    def hook(pairs):
        seen.append([k for k, _ in pairs])
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    top = seen[-1]
    return len(top) != len(set(top))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=request_bodies(),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "replace", "dup"]),
            st.integers(min_value=0),
            st.sampled_from(
                list(b'{}[]",:\\ \t\n\r\x00\x0b\x0cntfuel0-+.eE9aA') + [0xC3, 0xFF, 0xE2]
            ),
            st.integers(min_value=0, max_value=8),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_parse_json_refuses_what_json_loads_refuses(case, edits):
    body = bytearray(case[0])
    for op, at, byte, n in edits:
        at %= len(body) + 1
        if op == "insert":
            body[at:at] = bytes([byte])
        elif op == "delete":
            del body[at : at + 1 + n % 3]
        elif op == "replace" and at < len(body):
            body[at] = byte
        elif op == "dup":
            body[at:at] = body[at : at + n + 1]
    body = bytes(body)
    try:
        text = body.decode("utf-8")
        expected = json.loads(text)
        ok = isinstance(expected, dict) and not _top_level_duplicates(text)
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        with pytest.raises(BodyRefused):
            parse_json(body)
        return
    got, span = parse_json(body)
    assert got == expected
    if "model" in expected:
        assert json.loads(body[span[0] : span[1]]) == expected["model"]
    else:
        assert span is None


# --- plan_request: what goes upstream ------------------------------------------------

_STREAM_OPTIONS = st.sampled_from(
    [
        None,
        "absent",
        {},
        {"include_usage": False},
        {"include_usage": True},
        {"include_usage": None, "x": 1},
        {"continuous_usage_stats": True},
    ]
)


@settings(max_examples=600, deadline=None)
@given(
    case=request_bodies(),
    stream=st.sampled_from([True, False, "absent", 1]),
    options=_STREAM_OPTIONS,
    routed=st.none() | st.sampled_from(["gpt-4o", "o1/é", 'a"b\\c']),
    path=st.sampled_from(["/v1/chat/completions", "/v1/chat/completions/", "/v1/completions"]),
)
def test_plan_request_asks_for_usage_and_keeps_everything_else(case, stream, options, routed, path):
    from lectr.providers.body import read_body
    from lectr.usage.meters import plan_request

    _, doc, _ = case
    doc = {k: v for k, v in doc.items() if k not in ("stream", "stream_options")}
    doc.setdefault("model", "m")
    if (
        not isinstance(doc["model"], str)
        or not (doc["model"].isascii() and doc["model"].isprintable())
        or not 1 <= len(doc["model"]) <= 256
    ):
        doc["model"] = "m"
    if stream != "absent":
        doc["stream"] = stream
    if options != "absent":
        doc["stream_options"] = options
    body = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        read = read_body([b"application/json"], body)
    except BodyRefused:
        return
    planned = plan_request("openai", b"POST", path, read, routed)
    sent = json.loads(planned.body)
    expected = dict(doc)
    if routed is not None:
        expected["model"] = routed
    asks = isinstance(options, dict) and options.get("include_usage") is True
    inject = stream is True and path.rstrip("/") == "/v1/chat/completions" and not asks
    assert planned.strip_usage_chunk is inject
    if inject:
        expected["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    assert sent == expected
    assert planned.model == expected["model"]
    if not inject and routed is None:
        assert planned.body is body or planned.body == body
