"""The strict body reading behind the model policy (lectr/providers/body.py).

The property: for any body Lectr does not refuse, the model it judged is the
model every parser - a strict one, a lenient one that keeps the last
duplicate (json5: comments, trailing commas, unquoted keys, extra
whitespace), and one that keeps the *first* duplicate - reads from the bytes
Lectr forwards.
"""

from __future__ import annotations

import json

import json5
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.providers.body import BodyRefused, media_type, read_body

JSON = [b"application/json"]


def strict_model(body: bytes):
    doc = json.loads(body)
    return doc.get("model") if isinstance(doc, dict) else None


def lenient_model(body: bytes):
    doc = json5.loads(body.decode("utf-8", "surrogatepass"))
    return doc.get("model") if isinstance(doc, dict) else None


def first_wins_model(body: bytes):
    doc = json.loads(body, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    return doc.get("model") if isinstance(doc, dict) else None


def parsers_agree(judged, forwarded: bytes) -> None:
    """Every parser that can read the forwarded bytes reads the judged model."""
    for parse in (strict_model, lenient_model, first_wins_model):
        try:
            seen = parse(forwarded)
        except Exception:  # a parser that cannot read it: the provider refuses it too
            continue
        assert seen == judged, (parse.__name__, forwarded[:200])


models = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
    ),
    st.text(min_size=1, max_size=10),
)
whitespace = st.sampled_from(["", " ", "\n", "\t", "\r\n", "\x0c", "\x0b", "\u00a0", "   \n  "])
key_spellings = st.sampled_from(
    ['"model"', '"mod\\u0065l"', '"\\u006dodel"', "model", "'model'", '"Model"', '"model "']
)


@st.composite
def json_like_bodies(draw) -> bytes:
    """Objects with zero, one or two model members, spelled and spaced in
    every way some parser accepts, plus decoys nested deeper."""
    members = []
    for _ in range(draw(st.integers(0, 2))):
        key = draw(key_spellings)
        value = draw(st.one_of(models.map(json.dumps), st.sampled_from(["1", "null", "[]"])))
        members.append(f"{key}{draw(whitespace)}:{draw(whitespace)}{value}")
    if draw(st.booleans()):
        members.append('"messages":[{"role":"user","content":"hi","model":"decoy"}]')
    if draw(st.booleans()):
        members.append('"stream":true')
    draw(st.randoms()).shuffle(members)
    sep = draw(st.sampled_from([",", ", ", ",\n", " /* c */ ,"]))
    text = "{" + draw(whitespace) + sep.join(members) + draw(st.sampled_from(["", ","])) + "}"
    prefix = draw(st.sampled_from(["", "\ufeff", " ", "\n\n", "\x0c", "\u00a0"]))
    return (prefix + text + draw(whitespace)).encode("utf-8")


content_types = st.sampled_from(
    [
        None,
        [b"application/json"],
        [b"application/json; charset=utf-8"],
        [b"text/plain"],
        [b"application/x-www-form-urlencoded"],
        [b"application/vnd.api+json"],
        [b"application/json", b"text/plain"],
        [b"application/json, text/plain"],
    ]
)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(content_types, json_like_bodies())
def test_judged_model_is_the_model_every_parser_reads(ctype, body):
    try:
        read = read_body(ctype, body)
    except BodyRefused:
        return
    assert read.kind == "json"
    assert read.model == read.doc.get("model")
    parsers_agree(read.model, read.body)


@settings(max_examples=300)
@given(st.binary(max_size=300), content_types)
def test_arbitrary_bytes_never_crash_and_never_forward_an_unjudged_model(body, ctype):
    try:
        read = read_body(ctype, body)
    except BodyRefused:
        return
    if read.kind == "json":
        parsers_agree(read.model, read.body)
    elif read.kind in ("opaque", "empty"):
        assert read.model is None
        # nothing a lenient JSON parser could read a model from
        try:
            seen = lenient_model(read.body)
        except Exception:
            seen = None
        assert seen is None


@pytest.mark.parametrize(
    ("ctype", "body", "reason"),
    [
        (JSON, b'{"model":"a","model":"b"}', "repeats the key"),
        (JSON, b'{"model":"a","mod\\u0065l":"b"}', "repeats the key"),
        (JSON, b'\xff\xfe{\x00"\x00m\x00', "byte-order mark"),
        (JSON, b'{"model":"a",}', "not valid JSON"),
        (JSON, b"{'model':'a'}", "not valid JSON"),
        (JSON, b'{"model":"a"} // c', "not valid JSON"),
        (JSON, b'{"model":"a"}{"model":"b"}', "not valid JSON"),
        (JSON, b'["model"]', "must be a JSON object"),
        (JSON, b'{"model":1}', "must be a string"),
        (JSON, b'{"model":"a\\u0000b"}', "printable ASCII"),
        (JSON, b'{"model":"\\ud800"}', "printable ASCII"),
        (JSON, b'{"model":"\\ud807\\udfc0"}', "printable ASCII"),
        (JSON, '{"model":"gpt-4о"}'.encode(), "printable ASCII"),
        (JSON, b'{"model":"' + b"m" * 300 + b'"}', "1 to 256"),
        (JSON, b'{"model":"\xc3("}', "not valid UTF-8"),
        ([b"text/plain"], b'\x0c{"model":"a"}', "not valid JSON"),
        ([b"text/plain"], b" " * 5000 + b'\t{"model":"a","model":"b"}', "repeats"),
        ([b"application/json", b"text/plain"], b'{"model":"a"}', "more than one"),
        ([b"application/json, text/plain"], b'{"model":"a"}', "malformed"),
        ([b"application/json; charset=utf-8; charset=latin1"], b"{}", "repeats its"),
        (
            [b"application/x-www-form-urlencoded"],
            b"model=a&model=b",
            "repeats the 'model' field",
        ),
        ([b"application/x-www-form-urlencoded"], b"a=1;model=b", "'&' only"),
        ([b"application/x-www-form-urlencoded"], b"model=%zz", "percent-encoding"),
        ([b"application/x-www-form-urlencoded"], b"&".join([b"a=1"] * 1001), "at most 1000"),
        ([b"application/x-www-form-urlencoded"], "model=é".encode(), "ASCII"),
        ([b"multipart/form-data"], b"--x\r\n", "boundary"),
        ([b"multipart/form-data; boundary=x"], b'{"model":"a"}', "looks like JSON"),
    ],
)
def test_ambiguous_or_malformed_bodies_are_refused(ctype, body, reason):
    with pytest.raises(BodyRefused, match=reason):
        read_body(ctype, body)


def multipart(*parts: bytes, boundary: bytes = b"XyZ") -> bytes:
    out = b""
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


MP = [b"multipart/form-data; boundary=XyZ"]


def test_multipart_model_and_its_span():
    body = multipart(
        b'Content-Disposition: form-data; name="file"; filename="a;b.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF--XyZ not a boundary",
        b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1',
    )
    read = read_body(MP, body)
    assert read.model == "whisper-1"
    start, end = read.model_span
    assert body[start:end] == b"whisper-1"


@pytest.mark.parametrize(
    ("part2", "reason"),
    [
        (b"Content-Disposition: form-data; name=model\r\n\r\ngpt", "repeats the 'model'"),
        (b'Content-Disposition: form-data; name="model"\r\n\r\ngpt', "repeats the 'model'"),
        (b"Content-Disposition: form-data; name*=UTF-8''model\r\n\r\ngpt", "ambiguous"),
        (b'Content-Disposition: form-data; name="a"; name="b"\r\n\r\nx', "ambiguous"),
        (b'Content-Disposition: attachment; name="model"\r\n\r\nx', "'form-data'"),
        (b'Content-Disposition : form-data; name="x"\r\n\r\nx', "malformed headers"),
        (b'Content-Disposition: form-data; name="x"\r\n folded\r\n\r\nx', "malformed"),
        (b"Content-Transfer-Encoding: base64\r\n\r\nx", "Content-Transfer-Encoding"),
    ],
)
def test_multipart_ambiguities_are_refused(part2, reason):
    first = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
    with pytest.raises(BodyRefused, match=reason):
        read_body(MP, multipart(first, part2))


def test_a_utf8_bom_is_removed_from_what_is_forwarded():
    read = read_body(JSON, b'\xef\xbb\xbf{"model":"gpt-4o"}')
    assert read.body == b'{"model":"gpt-4o"}'
    assert read.model == "gpt-4o"


def test_json_behind_any_whitespace_is_judged_whatever_the_declared_type():
    for ctype in (None, [b"text/plain"], [b"application/x-www-form-urlencoded"]):
        read = read_body(ctype, b" \r\n\t" * 3000 + b'{"model":"gpt-4o"}')
        assert (read.kind, read.model) == ("json", "gpt-4o")


def test_form_model():
    read = read_body([b"application/x-www-form-urlencoded"], b"a=1&mod%65l=gpt%2D4&b=+")
    assert (read.kind, read.model) == ("form", "gpt-4")


def test_bodies_without_a_model():
    assert read_body(None, b"").kind == "empty"
    assert read_body([b"audio/wav"], b"RIFF\x00\x01").model is None
    assert read_body(JSON, b'{"input":"x"}').model is None


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("model", "stream", "stream_options")),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=4,
    ),
    st.booleans(),
    st.sampled_from([None, "gpt-4o", 'a"b\\c']),
    st.sampled_from([True, False]),
)
def test_a_routed_model_replaces_the_value_and_nothing_else(other, stream, old, ensure_ascii):
    """Routes rewrite the model in place: the body sent parses to the client's
    document with the route's model (and the usage request, for a stream)."""
    from lectr.usage.meters import plan_request

    doc = dict(other)
    if old is not None:
        doc["model"] = old
    if stream:
        doc["stream"] = True
    raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
    read = read_body(JSON, raw)
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read, "route-target")
    expected = {**doc, "model": "route-target"}
    if stream:
        expected["stream_options"] = {"include_usage": True}
    assert json.loads(plan.body) == expected
    assert plan.strip_usage_chunk is stream


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), min_size=1
    ),
    st.booleans(),
)
def test_any_routed_model_is_written_as_a_json_string(target, stream):
    """Whatever a route names (quotes, backslashes, controls, lone
    surrogates, astral characters), the body sent carries exactly that
    model, as ASCII JSON, and every other byte of the client's body."""
    from lectr.usage.meters import plan_request

    raw = b'{"model":"gpt-4o","messages":[],"stream":' + (b"true" if stream else b"false") + b"}"
    plan = plan_request("openai", b"POST", "/v1/chat/completions", read_body(JSON, raw), target)
    sent = json.loads(plan.body)
    assert sent["model"] == target
    assert plan.body.isascii()
    assert sent["messages"] == [] and sent["stream"] is stream


@settings(max_examples=300, deadline=None)
@given(
    ctype=st.binary(max_size=80)
    | st.sampled_from(
        [
            b"application/json",
            b"Application/JSON; charset=utf-8",
            b'multipart/form-data; boundary="a b"',
            b"text/plain; a=1; A=2",
            b"application/json; charset",
            b"",
            b" ",
        ]
    )
)
def test_media_type_answers_the_same_when_remembered(ctype):
    # well-formed values are remembered: the second answer is the first, and a
    # malformed value is refused every time (never remembered as good)
    def judge():
        try:
            mtype, params = media_type(ctype)
            return mtype, dict(params)
        except BodyRefused as e:
            return str(e)

    first = judge()
    assert judge() == first
    if not isinstance(first, str):
        _, params = media_type(ctype)
        with pytest.raises(TypeError):
            params[b"boundary"] = b"x"  # read-only: one caller cannot change another's
