"""No admin input reaches a 500: every string the admin API accepts (JSON
strings and keys, the path, query names and values) must be text, and what
is not text is a 400 ``invalid_text`` in the API's error format.

Property test over every route of the OpenAPI document, against the whole
Lectr service in-process (real PostgreSQL, real HTTP on loopback): bodies
generated from each route's own JSON Schema with hostile strings mixed in
(lone surrogates sent as ``\\ud800`` escapes, NULs, strings far over their
length limits, non-BMP text), hostile path parameters and query strings
(``%ED%A0%80``, overlong UTF-8, stray bytes, ``%00``). Every answer must be
a documented status with a body matching the document.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from urllib.parse import quote_from_bytes

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.http_headers import Headers

from lectr.admin.app import AdminApp
from lectr.admin.validation import decode_path, decode_query, parse_json_body, text_problem
from lectr.errors import BadRequest
from tests.support.admin import ADMIN_TOKEN, Answer, start_admin_env
from tests.support.fake_provider import OPENAI_KEY
from tests.support.http_wire import sleep

DOC = AdminApp.openapi()
OPERATIONS = [
    (method.upper(), path, op) for path, ops in DOC["paths"].items() for method, op in ops.items()
]
EXAMPLES = int(os.environ.get("LECTR_PROPERTY_EXAMPLES", "250"))


# --- the rule itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, ok",
    [
        ("plain", True),
        ("", True),
        ("é漢字🙂", True),
        ("\ud83d\ude42", False),  # a surrogate *pair* in a Python str is still not text
        ("a\ud800b", False),
        ("\udfff", False),
        ("a\x00b", False),
        ("tab\tand\nnewline", True),  # field validators decide about other controls
    ],
)
def test_text_problem(value, ok):
    assert (text_problem(value) is None) is ok


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'{"a": [{"b": ["ok", "\\u0000"]}]}',
        b'["\\ud83d"]',
    ],
)
def test_json_bodies_with_non_text_are_refused(raw):
    with pytest.raises(BadRequest) as refused:
        parse_json_body(raw)
    assert refused.value.code == "invalid_text"


def test_a_surrogate_pair_escape_is_text():
    assert parse_json_body(b'{"name": "\\ud83d\\ude42"}') == {"name": "🙂"}


@pytest.mark.parametrize(
    "uri",
    [
        b"/admin/orgs/%ED%A0%80",  # an encoded surrogate
        b"/admin/orgs/%C0%AF",  # overlong "/"
        b"/admin/orgs/%FF",
        b"/admin/orgs/\xff",
        b"/admin/orgs/a%00b",
        b"/admin/orgs?limit=%ED%A0%80",
        b"/admin/orgs?%ED%A0%80=1",
        b"/admin/orgs?model=a%00",
        b"/admin/orgs?model=\xc3",
    ],
)
def test_request_targets_that_are_not_text_are_refused(uri):
    with pytest.raises(BadRequest) as refused:
        decode_path(uri)
        decode_query(uri)
    assert refused.value.code == "invalid_text"


def test_query_decoding():
    assert decode_query(b"/x?a=1&b=x+y%20z&a=%C3%A9&&c") == {
        "a": ["1", "é"],
        "b": ["x y z"],
        "c": [""],
    }
    assert decode_path(b"/admin/orgs/%C3%A9?x=%ED") == "/admin/orgs/é"


# --- every route, over HTTP ---------------------------------------------------------------


@dataclass
class Env:
    admin: object
    port: int
    ids: dict[str, list[str]]


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    admin = e.admin
    org = (await admin.post("/admin/orgs", {"name": "Acme"})).json
    org_id, key_id = org["org"]["id"], org["key"]["id"]
    member = await admin.post(
        f"/admin/orgs/{org_id}/members", {"subject": "auth0|someone", "role": "member"}
    )
    pkey = await admin.post(
        f"/admin/orgs/{org_id}/provider-keys", {"provider": "openai", "key": OPENAI_KEY}
    )
    assert (member.status, pkey.status) == (201, 201)
    ids = {
        "org_id": [org_id],
        "key_id": [key_id, pkey.json["id"]],
        "user_id": [member.json["user_id"]],
        "provider": ["openai", "anthropic"],
    }
    yield Env(admin, int(admin.base_url.rsplit(":", 1)[1]), ids)
    await e.stop()


# hostile strings: what JSON can carry but UTF-8/PostgreSQL cannot, plus the usual suspects
SPECIALS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x01", "\x7f", "\u2028", "\ufeff"]
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=("Cs", "Cc", "Lo", "So")), max_size=10),
    st.builds(
        lambda a, s, b: a + s + b,
        st.text(max_size=8),
        st.sampled_from(SPECIALS),
        st.text(max_size=8),
    ),
    st.integers(150, 5000).map(lambda n: "x" * n),  # over every maxLength
    st.sampled_from(
        ["lc_" + "0" * 36, "sk-" + "a" * 20, "a@b.c", "gpt-4o*", "openai", "2025-01-01"]
    ),
)


def json_values(depth: int = 2) -> st.SearchStrategy:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        hostile_text,
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)
        ),
        max_leaves=8,
    )


def from_schema(schema: dict | None) -> st.SearchStrategy:
    """Values shaped by a JSON Schema (mostly), with hostile strings."""
    if schema is None:
        return json_values()
    kinds = schema.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    options = []
    for kind in kinds:
        if kind == "object":
            props = schema.get("properties", {})
            options.append(
                st.fixed_dictionaries(
                    {
                        k: from_schema(v)
                        for k, v in props.items()
                        if k in schema.get("required", ())
                    },
                    optional={
                        **{
                            k: from_schema(v)
                            for k, v in props.items()
                            if k not in schema.get("required", ())
                        },
                        "\ud800": json_values(),
                        "x\x00": json_values(),
                    },
                )
            )
        elif kind == "array":
            options.append(st.lists(from_schema(schema.get("items")), max_size=5))
        elif kind == "string":
            choices = [hostile_text]
            if "enum" in schema:
                choices.append(st.sampled_from(schema["enum"]))
            if schema.get("format") == "uuid":
                choices.append(st.uuids().map(str))
            if schema.get("format") == "email":
                choices.append(st.builds("{}@{}.com".format, hostile_text, hostile_text))
            options.append(st.one_of(*choices))
        elif kind == "integer":
            options.append(st.integers(-(2**70), 2**70))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "null":
            options.append(st.none())
        else:
            options.append(json_values())
    options.append(json_values())  # sometimes not the declared shape at all
    return st.one_of(*options)


def encode_component(value: str) -> bytes:
    """Percent-encode every byte of ``value`` as UTF-8, letting surrogates
    through as the (invalid) bytes they would be (``%ED%A0%80``)."""
    return quote_from_bytes(value.encode("utf-8", "surrogatepass"), safe="").encode()


RAW_BYTES = [b"%ED%A0%80", b"%C0%AF", b"%FF", b"%00", b"%E2%82", b"\xff", b"%", b"%zz"]
raw_component = st.one_of(
    hostile_text.map(encode_component),
    st.builds(
        lambda a, raw, b: encode_component(a) + raw + encode_component(b),
        st.text(string.ascii_letters, max_size=5),
        st.sampled_from(RAW_BYTES),
        st.text(string.ascii_letters, max_size=5),
    ),
)


@st.composite
def requests(draw, ids: dict[str, list[str]]):
    method, template, op = draw(st.sampled_from(OPERATIONS))
    path = template.encode()
    for name in re.findall(r"\{(\w+)\}", template):
        known = ids.get(name, [])
        if method == "DELETE" and template == "/admin/orgs/{org_id}":
            known = []  # never delete the org the other examples need
        if known and draw(st.booleans()):
            value = draw(st.sampled_from(known)).encode()
        else:
            value = draw(raw_component)
        path = path.replace(b"{" + name.encode() + b"}", value or b"x")
    declared = [p for p in op.get("parameters", ()) if p["in"] == "query"]
    fields = []
    for param in declared:
        if draw(st.booleans()):
            fields.append(
                encode_component(param["name"])
                + b"="
                + draw(st.one_of(raw_component, st.just(b"5")))
            )
    if draw(st.integers(0, 4)) == 0:
        fields.append(draw(raw_component) + b"=" + draw(raw_component))
    if fields:
        path += b"?" + b"&".join(fields)
    body = None
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None or draw(st.integers(0, 5)) == 0:
        kind = draw(st.integers(0, 9))
        if kind == 0:
            body = draw(st.binary(max_size=40))  # not even UTF-8, most of the time
        else:
            body = json.dumps(draw(from_schema(schema))).encode()  # ensure_ascii: "\ud800" escapes
    return method, template, path, body


class _RawExchange(Protocol):
    """One HTTP/1.0 exchange with the request target sent byte for byte
    (HTTP clients refuse to send the malformed targets this test needs)."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self._received))


async def send(env: Env, method: str, path: bytes, body: bytes | None) -> Answer:
    head = [
        method.encode() + b" " + path + b" HTTP/1.0",
        b"Host: 127.0.0.1",
        b"Authorization: Bearer " + ADMIN_TOKEN.encode(),
    ]
    if body is not None:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    exchange = _RawExchange(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", env.port), exchange)
    raw = await exchange.done
    header_block, _, content = raw.partition(b"\r\n\r\n")
    status_line, *lines = header_block.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    return Answer(int(status_line.split(b" ")[1]), content, headers)


def check(env: Env, method: str, template: str, path: bytes, body, answer: Answer) -> None:
    where = f"{method} {path!r} body={body!r:.300}"
    assert answer.status < 500 or (answer.status, template) == (
        502,
        "/admin/orgs/{org_id}/provider-keys",
    ), f"{where}: {answer.status} {answer.body!r}"
    if not all(0x21 <= b < 0x7F for b in path):
        # twisted.web refuses a request line with raw bytes outside printable
        # ASCII itself (a bare "400 Bad Request"): the app never sees it
        assert (answer.status, answer.body) == (400, b""), where
        return
    if answer.status >= 400:
        error = answer.json["error"]
        assert set(error) == {"code", "message"} and error["message"], where
    env.admin.checker.check(method, template, answer)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_classic_inputs_give_400_on_every_route(env):
    """Deterministic sweep: each shape of non-text input on each route is
    a 400 invalid_text (whatever the route, the method, the body)."""
    org = env.ids["org_id"][0].encode()
    swept = 0
    for method, template, op in OPERATIONS:
        real = template.encode()
        for name, values in env.ids.items():
            real = real.replace(b"{" + name.encode() + b"}", values[0].encode())
        cases = [(real + b"?x=%ED%A0%80", None), (real + b"?%ED%A0%80=1", None)]
        head = real.rsplit(b"/", 1)[0]
        cases += [(head + b"/%ED%A0%80", None), (head + b"/a%00b", None), (real + b"%C0%AF", None)]
        if "requestBody" in op:
            cases.append((real, b'{"name": "\\ud800", "key": "\\udfff"}'))
            cases.append((real, b'{"\\ud800": 1}'))
            cases.append((real, b'{"name": "a\\u0000"}'))
        for path, body in cases:
            if (method, template, body) == ("DELETE", "/admin/orgs/{org_id}", None) and (
                path.startswith(b"/admin/orgs/" + org) and b"%" not in path
            ):
                continue  # never delete the org the other cases need
            answer = await send(env, method, path, body)
            check(env, method, template, path, body, answer)
            assert (answer.status, answer.error_code) == (400, "invalid_text"), (
                method,
                path,
                body,
                answer.status,
                answer.body,
            )
            swept += 1
    assert swept > 5 * len(OPERATIONS)


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_no_generated_input_reaches_a_500(env, data):
    method, template, path, body = data.draw(requests(env.ids))
    answer = await send(env, method, path, body)
    check(env, method, template, path, body, answer)


# --- what twisted.web would not read to its end ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_request_line_longer_than_read_is_answered_414(env):
    """twisted.web reads lines of up to 16 KiB and closes the connection
    without a word past that; the admin port answers, and the answer reaches
    the client even though the rest of the request was never read."""
    for n in (17_000, 70_000, 300_000):
        answer = await send(env, "GET", b"/admin/orgs/x/requests?since=" + b"x" * n, None)
        assert (answer.status, answer.error_code) == (414, "uri_too_long"), n
        assert answer.headers.getRawHeaders(b"connection") == [b"close"]
        assert answer.headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]


@pytest_twisted.ensureDeferred
async def test_a_header_line_longer_than_read_is_answered_431(env):
    exchange = _RawExchange(
        b"GET /admin/orgs HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Big: " + b"y" * 40_000 + b"\r\n\r\n"
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", env.port), exchange)
    raw = await exchange.done
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"


def _lingering() -> list:
    return [
        c
        for c in reactor.getDelayedCalls()
        if getattr(c.func, "__qualname__", "").startswith("answer_and_close.")
    ]


@pytest_twisted.ensureDeferred
async def test_a_lingering_close_ends_with_the_connection(env):
    """A refusal closes lingering, cut after LINGER_SECONDS at most; a client
    that reads the answer and closes leaves nothing behind (the cut is
    cancelled, not left to fire on a closed connection)."""
    earlier = set(_lingering())  # (an earlier test's connection may not be closed yet)

    def ours() -> list:
        return [c for c in _lingering() if c not in earlier]

    exchange = _RawExchange(
        b"GET /admin/orgs HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Big: " + b"y" * 40_000 + b"\r\n\r\n"
    )
    conn = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", env.port), exchange)
    conn.transport.pauseProducing()  # the answer waits, unread: the cut is pending
    await sleep(0.2)
    assert len(ours()) == 1
    conn.transport.resumeProducing()
    raw = await exchange.done
    assert raw.startswith(b"HTTP/1.1 431 ")
    for _ in range(50):  # the server sees the client's close
        if not ours():
            break
        await sleep(0.02)
    assert ours() == []


@pytest_twisted.ensureDeferred
async def test_a_refused_body_still_being_sent_does_not_lose_the_413(env):
    """The 413 goes out before the body is read; the client is still sending
    megabytes. Closing then would make the kernel reset the connection and
    destroy the answer on its way: the close lingers instead."""
    body = b"{" + b" " * (8 * 1024 * 1024) + b"}"
    for _ in range(3):
        exchange = _RawExchange(
            b"POST /admin/orgs HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + ADMIN_TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        conn = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", env.port), exchange)
        conn.transport.pauseProducing()  # the client reads only once the server has closed
        await sleep(0.5)
        conn.transport.resumeProducing()
        raw = await exchange.done
        assert raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), raw[:80]
