"""A body judged in the judge process reads as the same body judged on the
reactor (lectr.proxy.judge): the same refusal, or the same model, spans and
bytes, and then the same decisions downstream: the bytes sent upstream
(with a route's model and the usage request), the affinity that picks a key,
the worst case a budget reserves. Generated bodies, both dialects; no
process here (the judge's own function against read_body), the processes
themselves are tested in test_body_judge.py.

Also: plan_request splices the model and ``stream_options`` into the body
instead of re-serialising it, and the result reads as the re-serialised
document did."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lectr.http.headers import HeaderList
from lectr.policy.limits import Limits
from lectr.policy.plan import request_affinity
from lectr.providers.body import JUDGED_MEMBER_MAX, JUDGED_MEMBERS, BodyRefused, parses, read_body
from lectr.providers.dialects import DIALECTS
from lectr.proxy.judge import judge, read_from
from lectr.usage.meters import plan_request

NO_HEADERS = HeaderList([])
JSON = [b"application/json"]
TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20)
# long enough for a cacheable prefix (4 KiB) once a few are together
LONG = st.one_of(TEXT, TEXT.map(lambda t: t + "é" * 1500 + "x" * 1000))
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
MODEL = st.one_of(st.sampled_from(["gpt-4o", "claude-sonnet-4", "openai/gpt-4o"]), SCALAR)
BLOCK = st.fixed_dictionaries(
    {"type": st.just("text"), "text": LONG},
    optional={"cache_control": st.just({"type": "ephemeral"})},
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.one_of(LONG, st.lists(BLOCK, max_size=3)),
    }
)
OPTIONS = st.one_of(
    SCALAR,
    st.just({}),
    st.fixed_dictionaries({}, optional={"include_usage": SCALAR, "x": SCALAR}),
    st.lists(SCALAR, max_size=2),
)
MEMBERS = st.fixed_dictionaries(
    {},
    optional={
        "model": MODEL,
        "stream": st.one_of(st.just(True), SCALAR),
        "stream_options": OPTIONS,
        "max_tokens": st.one_of(st.integers(-2, 10**6), SCALAR),
        "max_completion_tokens": st.integers(0, 10**6),
        "max_output_tokens": SCALAR,
        "n": st.one_of(st.integers(0, 8), SCALAR),
        "best_of": st.integers(0, 8),
        "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(0, 99))),
        "messages": st.lists(MESSAGE, max_size=4),
        "input": st.one_of(LONG, st.lists(MESSAGE, max_size=2)),
        "instructions": LONG,
        "tools": st.lists(st.fixed_dictionaries({"name": TEXT}), max_size=2),
        "system": st.one_of(LONG, st.lists(BLOCK, max_size=2)),
        "user": SCALAR,
        "prompt_cache_key": SCALAR,
        "metadata": st.fixed_dictionaries({}, optional={"user_id": SCALAR}),
        "temperature": SCALAR,
    },
)


@st.composite
def bodies(draw) -> bytes:
    """A JSON body as a client may send it: any order of members, compact or
    indented, escaped or raw UTF-8, sometimes a BOM or a repeated key."""
    doc = draw(MEMBERS)
    items = draw(st.permutations(list(doc.items())))
    indent = draw(st.sampled_from([None, 2]))
    ascii_only = draw(st.booleans())
    try:
        text = json.dumps(dict(items), indent=indent, ensure_ascii=ascii_only)
        body = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only as an escape
        body = json.dumps(dict(items), indent=indent).encode("ascii")
    extra = draw(st.sampled_from([None, "model", "stream", "other"]))
    if extra is not None and items:
        body = body[: body.rindex(b"}")] + f',"{extra}":"again"}}'.encode()
    if draw(st.integers(0, 9)) == 0:
        body = b"\xef\xbb\xbf" + body
    return body


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except BodyRefused as e:
        return ("refused", str(e))


class _Call:
    def __init__(self, read) -> None:
        self.read = read
        self.plan = self
        self.targets = ()


class _NoLimits:
    admit = None

    class limiter:
        limited_orgs = frozenset()


def reserved(read) -> tuple:
    """The arguments the limits step hands the pricing catalogue's worst case."""
    seen = []
    step = Limits(_NoLimits, dearest=lambda *args: seen.append(args))
    step._reserve(_Call(read))()
    return seen[0]


def decisions(read, dialect: str) -> list:
    """Everything downstream that depends on how the body was read."""
    out = [
        read.kind,
        read.model,
        read.body,
        read.model_span,
        read.options_span,
        read.stream,
        request_affinity(NO_HEADERS, DIALECTS[dialect], read),
        reserved(read),
    ]
    for path in ("/v1/chat/completions", "/v1/messages"):
        for model in (None, "routed-model", read.model):
            plan = outcome(plan_request, dialect, b"POST", path, read, model)
            if plan[0] == "ok":
                p = plan[1]
                plan = ("ok", p.model, p.stream, p.body, p.strip_usage_chunk)
            out.append(plan)
    return out


def check_same(body: bytes, dialect: str) -> None:
    inline = outcome(read_body, JSON, body)
    judged = outcome(lambda: read_from(judge(JSON, body, dialect), body))
    if inline[0] == "refused" or judged[0] == "refused":
        assert judged == inline
        return
    read, far = inline[1], judged[1]
    assert far.facts is not None and far.doc is not None
    assert set(far.doc) <= JUDGED_MEMBERS  # only what Lectr acts on came back
    assert decisions(far, dialect) == decisions(read, dialect)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), dialect=st.sampled_from(["openai", "anthropic"]))
@example(body=b'{"model":"gpt-4o","stream":true,"stream_options":null}', dialect="openai")
@example(body=b'{"stream":true}', dialect="openai")
@example(body=b'{"model":"m","model":"m"}', dialect="openai")
@example(body=b'\xef\xbb\xbf{"model":"caf\xc3\xa9","stream_options":{}}', dialect="openai")
def test_a_judged_body_decides_as_the_same_body_read_here(body, dialect):
    check_same(body, dialect)


def test_a_large_member_lectr_acts_on_is_refused_whatever_the_body_size():
    # (only these members travel back from the judge: none is ever more than
    # a few dozen bytes)
    body = json.dumps({"model": "m", "stream_options": {"x": "y" * JUDGED_MEMBER_MAX}}).encode()
    assert outcome(lambda: judge(JSON, body, "openai"))[0] == "refused"
    assert outcome(read_body, JSON, body) == outcome(lambda: judge(JSON, body, "openai"))
    # anything else may be as large as the body
    body = json.dumps({"model": "m", "input": "y" * (4 * JUDGED_MEMBER_MAX)}).encode()
    assert outcome(lambda: judge(JSON, body, "openai"))[0] == "ok"


@given(kind=st.sampled_from(["form", "multipart", "opaque", "empty"]))
def test_other_kinds_of_body_read_the_same(kind):
    ct, body = {
        "form": ([b"application/x-www-form-urlencoded"], b"model=gpt-4o&x=1"),
        "multipart": (
            [b"multipart/form-data; boundary=B"],
            b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--B--\r\n',
        ),
        "opaque": ([b"audio/wav"], b"RIFF...."),
        "empty": (None, b""),
    }[kind]
    inline = read_body(ct, body)
    far = read_from(judge(ct, body, "openai"), body)
    assert (far.kind, far.model, far.model_span, far.body, far.doc, far.facts) == (
        inline.kind,
        inline.model,
        inline.model_span,
        inline.body,
        None,
        None,
    )


# --- splicing, not re-serialising -------------------------------------------------------------


def reserialised(doc: dict, model: str, inject: bool) -> dict:
    """What plan_request sent before it spliced: the document with the model
    and the usage request set."""
    out = dict(doc)
    out["model"] = model
    if inject:
        out["stream_options"] = {**(doc.get("stream_options") or {}), "include_usage": True}
    return out


@settings(max_examples=300, deadline=None)
@given(body=bodies(), model=st.sampled_from(["routed-model", "gpt-4o", "m\u00e9\ud800"]))
def test_a_spliced_body_reads_as_the_reserialised_one(body, model):
    try:
        read = read_body(JSON, body)
    except BodyRefused:
        return
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read, model)
    sent = json.loads(plan.body)
    assert sent == reserialised(read.doc, model, plan.strip_usage_chunk)
    if plan.strip_usage_chunk:
        assert read.stream and not (
            isinstance(read.doc.get("stream_options"), dict)
            and read.doc["stream_options"].get("include_usage") is True
        )
    # every byte but the two values is the client's
    kept = read.body
    for span in sorted(s for s in (read.model_span, read.options_span) if s is not None)[::-1]:
        kept = kept[: span[0]] + kept[span[1] :]
    assert len(plan.body) >= len(kept)


def test_a_body_without_a_model_or_options_gets_them_after_its_brace():
    read = read_body(JSON, b' {"stream":true }')
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read, "m")
    assert plan.body == b' {"model":"m","stream_options":{"include_usage":true},"stream":true }'
    read = read_body(JSON, b"{ }")
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read, "m")
    assert plan.body == b'{"model":"m" }'


def test_options_are_replaced_where_they_are():
    body = b'{"stream":true, "stream_options" : {"x":1} , "model":"a"}'
    read = read_body(JSON, body)
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read, "b")
    assert plan.body == (
        b'{"stream":true, "stream_options" : {"x":1,"include_usage":true} , "model":"b"}'
    )


# --- which bodies go to the judge -------------------------------------------------------------

CONTENT_TYPES = st.one_of(
    st.none(),
    st.lists(
        st.sampled_from(
            [
                b"application/json",
                b"application/json; charset=utf-8",
                b"application/vnd.api+json",
                b"multipart/form-data; boundary=B",
                b"application/x-www-form-urlencoded",
                b"audio/wav",
                b"text/plain",
                b"image/png",
                b"",
                b"not a type",
            ]
        ),
        max_size=2,
    ),
)
RAW = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"{}", b' \n {"model":"m"}', b"[1]", b"\xef\xbb\xbf{}", b"RIFF"]),
)


@settings(max_examples=500)
@given(content_types=CONTENT_TYPES, body=RAW)
def test_a_body_not_worth_judging_elsewhere_is_decided_on_its_type_alone(content_types, body):
    """parses() is False only where read_body decides without parsing: an
    opaque or empty body, or a refusal of the Content-Type itself."""
    if parses(content_types, body):
        return
    try:
        read = read_body(content_types, body)
    except BodyRefused as e:
        assert "Content-Type" in str(e)
        return
    assert read.kind in ("opaque", "empty") and read.doc is None and read.model is None


def test_stream_options_too_deep_to_serialise_again_is_a_400_not_a_crash():
    body = b'{"model":"m","stream":true,"stream_options":{"x":' + b"[" * 300 + b"]" * 300 + b"}}"
    read = read_body(JSON, body)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)  # (as on a deeper stack)
    try:
        with pytest.raises(BodyRefused, match="nested too deeply"):
            plan_request("openai", b"POST", "/v1/chat/completions", read, None)
    finally:
        sys.setrecursionlimit(limit)
