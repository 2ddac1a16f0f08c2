"""The proxy end to end in-process: real LectrService, real PostgreSQL, real
HTTP over loopback to a fake provider that checks the key it receives."""

from __future__ import annotations

import hashlib
import json
import socket
from io import BytesIO

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from tests.support.fake_provider import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    FakeProviderServer,
    Script,
    sse,
)
from tests.support.lectr_service import proxy_url, start_lectr


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def eventually(predicate, timeout: float = 5.0, step: float = 0.01) -> float:
    """Wait until ``predicate()``; return the seconds it took."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await sleep(step)
        waited += step
    return waited


class Gateway:
    """A running Lectr with one org, its Lectr key and both provider keys."""

    def __init__(self, service, fake, org, key: str) -> None:
        self.service = service
        self.c = service.components
        self.fake = fake
        self.provider = fake.resource
        self.org = org
        self.key = key

    def url(self, path: str) -> str:
        return proxy_url(self.service, path)

    async def post(self, path: str, body, *, key: str | None = None, headers=None, raw=False):
        h = {"content-type": ["application/json"]}
        if key is not False:
            h["authorization"] = [f"Bearer {key or self.key}"]
        for name, value in (headers or {}).items():
            h[name] = value if isinstance(value, list) else [value]
        data = body if raw else json.dumps(body).encode()
        return await treq.post(
            self.url(path), data=data, headers=h, persistent=False, allow_redirects=False
        )


@pytest_twisted.async_yield_fixture
async def gw(db_url, tmp_path):
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake)
    c = service.components
    org, issued = await c.orgs.create_org("Acme")
    await c.vault.add_key(org.id, "openai", OPENAI_KEY, name="main")
    await c.vault.add_key(org.id, "anthropic", ANTHROPIC_KEY, name="main")
    fake.resource.reset()  # forget the validation calls
    yield Gateway(service, fake, org, issued.plaintext.reveal())
    await service.stopService()
    await fake.stop()


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


# --- routing and credentials ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openai_route_with_bearer_key(gw):
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 200
    doc = await resp.json()
    assert doc["choices"][0]["message"]["content"] == "Hello!"
    assert resp.headers.getRawHeaders(b"x-lectr-request-id")
    [seen] = gw.provider.calls("openai")
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {OPENAI_KEY}"
    assert seen.json() == CHAT


@pytest_twisted.ensureDeferred
async def test_anthropic_routes_with_x_api_key(gw):
    for path in ("/v1/messages", "/anthropic/v1/messages"):
        resp = await gw.post(
            path,
            MESSAGE,
            key=False,
            headers={"x-api-key": gw.key, "anthropic-version": "2023-06-01"},
        )
        assert resp.code == 200, await resp.text()
        assert (await resp.json())["type"] == "message"
    calls = gw.provider.calls("anthropic")
    assert [c.path for c in calls] == ["/v1/messages", "/v1/messages"]
    assert all(c.header("x-api-key") == ANTHROPIC_KEY for c in calls)
    assert all(c.header("authorization") is None for c in calls)


@pytest_twisted.ensureDeferred
async def test_v1_routes_to_anthropic_by_header(gw):
    resp = await gw.post("/v1/models/count", {}, headers={"anthropic-version": "2023-06-01"})
    assert resp.code == 200
    assert [c.provider for c in gw.provider.calls()] == ["anthropic"]


@pytest_twisted.ensureDeferred
async def test_query_string_and_any_method_kept(gw):
    resp = await treq.get(
        gw.url("/openai/v1/files?purpose=batch&limit=2"),
        headers={"authorization": [f"Bearer {gw.key}"]},
        persistent=False,
    )
    assert resp.code == 200
    [seen] = gw.provider.calls()
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1/files", "purpose=batch&limit=2")
    resp = await treq.delete(
        gw.url("/v1/files/file-abc"),
        headers={"authorization": [f"Bearer {gw.key}"]},
        persistent=False,
    )
    assert resp.code == 200
    assert gw.provider.calls()[-1].method == "DELETE"


@pytest_twisted.ensureDeferred
async def test_missing_unknown_and_malformed_keys_are_401_in_dialect(gw):
    bad = "lc_00000000-0000-4000-8000-000000000000"
    for key, path in ((bad, "/v1/chat/completions"), ("sk-not-lectr", "/v1/chat/completions")):
        resp = await gw.post(path, CHAT, key=key)
        assert resp.code == 401
        doc = await resp.json()
        assert doc["error"]["code"] == "invalid_api_key"
        assert bad not in json.dumps(doc) and "sk-not-lectr" not in json.dumps(doc)
    resp = await gw.post("/anthropic/v1/messages", MESSAGE, key=False)
    assert resp.code == 401
    doc = await resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"
    assert gw.provider.calls() == []


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_404(gw):
    resp = await gw.post("/v2/chat", CHAT)
    assert resp.code == 404
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert gw.provider.calls() == []


# --- kill switch, revocation, policy -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_kill_switch_within_one_second_and_back(gw):
    assert (await gw.post("/v1/chat/completions", CHAT)).code == 200  # cached now
    calls_before = len(gw.provider.calls())
    await gw.c.orgs.set_enabled(gw.org.id, False)

    async def status() -> int:
        return (await gw.post("/v1/chat/completions", CHAT)).code

    codes: list[int] = []

    async def poll_until(expected: int) -> None:
        for _ in range(100):
            code = await status()
            codes.append(code)
            if code == expected:
                return
            await sleep(0.01)
        raise AssertionError(codes)

    started = reactor.seconds()
    await poll_until(403)
    assert reactor.seconds() - started < 1.0
    denied = await gw.post("/v1/chat/completions", CHAT)
    assert (await denied.json())["error"]["message"] == "This organization is disabled."
    upstream_while_disabled = len(gw.provider.calls()) - calls_before
    await gw.c.orgs.set_enabled(gw.org.id, True)
    started = reactor.seconds()
    await poll_until(200)
    assert reactor.seconds() - started < 1.0
    # whatever reached the provider while disabled were only the polls that
    # raced the notification before the first 403
    assert upstream_while_disabled == codes.index(403)


@pytest_twisted.ensureDeferred
async def test_revoked_and_rotated_keys_stop_working(gw):
    assert (await gw.post("/v1/chat/completions", CHAT)).code == 200
    new = await gw.c.orgs.rotate_keys(gw.org.id)
    await eventually(lambda: gw.c.authenticator.cached(_hash(gw.key)) is None, 1.0)
    assert (await gw.post("/v1/chat/completions", CHAT)).code == 401
    assert (await gw.post("/v1/chat/completions", CHAT, key=new.plaintext.reveal())).code == 200
    await gw.c.orgs.revoke_key(gw.org.id, new.key.id)
    await eventually(lambda: gw.c.authenticator.cached(_hash(new.plaintext.reveal())) is None, 1.0)
    assert (await gw.post("/v1/chat/completions", CHAT, key=new.plaintext.reveal())).code == 401


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_policy_denials_make_no_upstream_call(gw):
    settings = gw.c.settings
    await settings.update(gw.org.id, "openai", blocked_models=["gpt-4o*"])
    await eventually(lambda: not settings.get(gw.org.id, "openai").allows_model("gpt-4o-mini"))
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 403
    assert "gpt-4o-mini" in (await resp.json())["error"]["message"]
    # the same JSON under another declared type is read all the same
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        resp = await gw.post("/v1/chat/completions", CHAT, headers={"content-type": ctype})
        assert resp.code == 403, ctype

    await settings.update(gw.org.id, "openai", blocked_models=[], enabled=False)
    await eventually(lambda: not settings.get(gw.org.id, "openai").enabled)
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 403
    assert "OpenAI is disabled" in (await resp.json())["error"]["message"]

    for info in await gw.c.vault.list_keys(gw.org.id):
        if info.provider == "anthropic":
            await gw.c.vault.delete_key(gw.org.id, info.id)
    await eventually(lambda: gw.c.vault.provider_key(gw.org.id, "anthropic") is None)
    resp = await gw.post("/anthropic/v1/messages", MESSAGE)
    assert resp.code == 403
    doc = await resp.json()
    assert doc["error"]["type"] == "permission_error"
    assert "No Anthropic key" in doc["error"]["message"]
    assert gw.provider.calls() == []


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(gw):
    resp = await gw.post("/v1/chat/completions", b'{"model": ', raw=True)
    assert resp.code == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert gw.provider.calls() == []


# --- the header swap -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_header_stripping_and_injection(gw):
    sent = {
        "x-api-key": gw.key,
        "connection": "keep-alive, X-Hop-Custom",
        "x-hop-custom": "dropped because Connection names it",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic Zm9vOmJhcg==",
        "x-forwarded-for": "10.0.0.1",
        "x-forwarded-proto": "https",
        "openai-organization": "org-123",
        "openai-project": "proj-9",
        "x-stainless-lang": "python",
        "user-agent": "OpenAI/Python 1.99",
        "anthropic-beta": "tools-2024-04-04",
    }
    resp = await gw.post("/openai/v1/chat/completions", CHAT, headers=sent)
    assert resp.code == 200
    [seen] = gw.provider.calls()
    got = seen.headers
    for name in (
        "x-api-key",
        "x-hop-custom",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
    ):
        assert name not in got, name
    assert seen.header("authorization") == f"Bearer {OPENAI_KEY}"
    for name in (
        "openai-organization",
        "openai-project",
        "x-stainless-lang",
        "user-agent",
        "anthropic-beta",
    ):
        assert seen.header(name) == sent[name], name
    assert seen.header("host") == gw.fake.origin.removeprefix("http://")
    assert all("lc_" not in v for values in got.values() for v in values)


@pytest_twisted.ensureDeferred
async def test_response_headers_pass_through_minus_hop_by_hop(gw):
    gw.provider.next(
        Script(
            status=429,
            body=b'{"error":{"message":"slow down"}}',
            headers={
                "retry-after": "7",
                "x-ratelimit-remaining-requests": "0",
                "keep-alive": "timeout=1",
                "openai-processing-ms": "12",
            },
        )
    )
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 429
    assert resp.headers.getRawHeaders(b"retry-after") == [b"7"]
    assert resp.headers.getRawHeaders(b"x-ratelimit-remaining-requests") == [b"0"]
    assert resp.headers.getRawHeaders(b"openai-processing-ms") == [b"12"]
    assert resp.headers.getRawHeaders(b"keep-alive") is None
    assert await resp.content() == b'{"error":{"message":"slow down"}}'


@pytest_twisted.ensureDeferred
async def test_relative_redirects_are_passed_back_not_followed(gw):
    """A relative Location resolves against Lectr's address: the client
    that follows it comes back through Lectr."""
    gw.provider.next(Script(status=307, redirect_to="/openai/v1/elsewhere"))
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 307
    assert resp.headers.getRawHeaders(b"location") == [b"/openai/v1/elsewhere"]
    assert len(gw.provider.calls()) == 1


@pytest_twisted.ensureDeferred
async def test_redirects_out_of_lectr_are_answered_502_not_passed_back(gw):
    """An absolute Location, the provider's own origin included, would send
    the client's SDK around Lectr with its Lectr key (the Anthropic SDK
    keeps x-api-key across origins): a 502 in the dialect names the origin
    (never the path or query), and nothing is followed."""
    for status in (301, 302, 307, 308):
        gw.provider.next(
            Script(status=status, redirect_to=gw.fake.origin + "/openai/v1/elsewhere?key=abc")
        )
        resp = await gw.post("/v1/chat/completions", CHAT)
        body = await resp.json()
        assert resp.code == 502, status
        assert resp.headers.getRawHeaders(b"location") is None
        message = body["error"]["message"]
        assert f"redirected the request ({status}) to {gw.fake.origin};" in message
        assert "elsewhere" not in message and "abc" not in message
    assert len(gw.provider.calls()) == 4


# --- streaming, disconnects, timeouts -------------------------------------------------------


class Chunks(Protocol):
    """Collects body chunks with the time each arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((reactor.seconds(), data))

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


async def open_stream(gw, path: str, body: dict, headers=None):
    agent = Agent(reactor)
    h = Headers({"content-type": ["application/json"], "authorization": [f"Bearer {gw.key}"]})
    for k, v in (headers or {}).items():
        h.setRawHeaders(k, [v])
    response = await agent.request(
        b"POST", gw.url(path).encode(), h, FileBodyProducer(BytesIO(json.dumps(body).encode()))
    )
    chunks = Chunks()
    response.deliverBody(chunks)
    return response, chunks


@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_as_the_provider_sends_them(gw):
    gw.provider.stream_interval = 0.15
    response, chunks = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    await eventually(lambda: chunks.chunks)
    # The first event reached the client while the provider was still streaming.
    assert gw.provider.open_requests
    await chunks.done
    assert chunks.reason.check(ResponseDone)
    times = [t for t, _ in chunks.chunks]
    assert times[-1] - times[0] > 0.3  # events were spread out, not buffered into one write
    body = b"".join(d for _, d in chunks.chunks)
    assert body.count(b"data: ") >= 7
    assert body.endswith(b"data: [DONE]\n\n")


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(gw):
    gw.provider.stream_interval = 0.3
    gw.provider.stream_words = ["w"] * 50
    response, chunks = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    await eventually(lambda: chunks.chunks)
    assert len(gw.provider.open_requests) == 1
    chunks.transport.stopProducing()  # the client goes away mid-stream
    took = await eventually(lambda: gw.provider.cancelled == 1, timeout=1.0)
    assert took < 1.0
    assert not gw.provider.open_requests


@pytest_twisted.ensureDeferred
async def test_client_disconnect_before_headers_cancels_upstream(gw):
    gw.provider.next(Script(hang=True))
    d = treq.post(
        gw.url("/v1/chat/completions"),
        data=json.dumps(CHAT).encode(),
        headers={"authorization": [f"Bearer {gw.key}"], "content-type": ["application/json"]},
        persistent=False,
    )
    await eventually(lambda: gw.provider.open_requests)
    d.cancel()
    await eventually(lambda: gw.provider.cancelled == 1, timeout=1.0)


@pytest_twisted.ensureDeferred
async def test_upstream_drop_mid_stream_aborts_the_client(gw):
    events = [sse({"n": i}) for i in range(10)]
    gw.provider.next(Script(events=events, interval=0.02, drop_after=3))
    response, chunks = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    await chunks.done
    assert chunks.reason.check(ResponseFailed), chunks.reason  # not a clean end
    assert b"".join(d for _, d in chunks.chunks).count(b"data: ") == 3


@pytest_twisted.ensureDeferred
async def test_headers_timeout_is_504(db_url, tmp_path):
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake, LECTR_UPSTREAM_HEADERS_TIMEOUT="0.3")
    try:
        c = service.components
        org, issued = await c.orgs.create_org("Acme")
        await c.vault.add_key(org.id, "anthropic", ANTHROPIC_KEY)
        fake.resource.next(Script(hang=True))
        resp = await treq.post(
            proxy_url(service, "/anthropic/v1/messages"),
            data=json.dumps(MESSAGE).encode(),
            headers={
                "x-api-key": [issued.plaintext.reveal()],
                "content-type": ["application/json"],
            },
            persistent=False,
        )
        assert resp.code == 504
        doc = await resp.json()
        assert doc["error"]["type"] == "timeout_error"
        await eventually(lambda: fake.resource.cancelled == 1)
    finally:
        await service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_idle_timeout_mid_stream_aborts(db_url, tmp_path):
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake, LECTR_UPSTREAM_IDLE_TIMEOUT="0.3")
    try:
        c = service.components
        org, issued = await c.orgs.create_org("Acme")
        await c.vault.add_key(org.id, "openai", OPENAI_KEY)
        fake.resource.next(Script(events=[sse({"n": 1}), sse({"n": 2})], interval=5.0))
        gw = Gateway(service, fake, org, issued.plaintext.reveal())
        response, chunks = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
        await chunks.done
        assert chunks.reason.check(ResponseFailed)
        assert len(chunks.chunks) == 1
        await eventually(lambda: fake.resource.cancelled == 1)
    finally:
        await service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_provider_is_502(db_url, tmp_path):
    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake)
    try:
        c = service.components
        org, issued = await c.orgs.create_org("Acme")
        await c.vault.add_key(org.id, "openai", OPENAI_KEY)
    finally:
        await fake.stop()  # the provider disappears
    try:
        resp = await treq.post(
            proxy_url(service, "/v1/chat/completions"),
            data=json.dumps(CHAT).encode(),
            headers={
                "authorization": [f"Bearer {issued.plaintext.reveal()}"],
                "content-type": ["application/json"],
            },
            persistent=False,
        )
        assert resp.code == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    finally:
        await service.stopService()


# --- request bodies ------------------------------------------------------------------------


def raw_http(port: int, request: bytes) -> bytes:
    """A blocking raw HTTP exchange (runs in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(request)
        except OSError:
            pass
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                break
            if not data:
                break
            out += data
        return out


@pytest_twisted.ensureDeferred
async def test_body_over_the_cap_is_413_before_reading(db_url, tmp_path):
    from twisted.internet.threads import deferToThread

    fake = await FakeProviderServer.start()
    service = await start_lectr(db_url, tmp_path, fake, LECTR_MAX_BODY_BYTES="1000")
    try:
        port = service.components.proxy_port.port.getHost().port
        # Declared too large: answered from Content-Length alone, body never sent.
        out = await deferToThread(
            raw_http,
            port,
            (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
            ),
        )
        assert out.startswith(b"HTTP/1.1 413 ")
        assert b'"request_too_large"' in out and b"x-lectr-request-id" in out
        # Chunked and growing past the cap: refused at cap + 1 (once the key
        # is known: without one, the body is never read).
        _, issued = await service.components.orgs.create_org("Acme")
        chunk = b"x" * 600
        chunked = b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
        out = await deferToThread(
            raw_http,
            port,
            b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: "
            + issued.plaintext.reveal().encode()
            + b"\r\n"
            + chunked,
        )
        assert out.startswith(b"HTTP/1.1 413 ")
        assert b'"type":"request_too_large"' in out
        out = await deferToThread(
            raw_http, port, b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\n" + chunked
        )
        assert out.startswith(b"HTTP/1.1 401 ")
        assert fake.resource.calls() == []
    finally:
        await service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_large_body_under_the_cap_passes_byte_for_byte(gw):
    content = "é" * 300_000  # 600 kB: more than twisted.web would keep in memory
    body = json.dumps({"model": "gpt-4o-mini", "input": content}, ensure_ascii=False).encode()
    resp = await gw.post("/v1/embeddings", body, raw=True)
    assert resp.code == 200
    assert gw.provider.calls()[-1].body == body


@pytest_twisted.ensureDeferred
async def test_content_length_passes_when_the_body_is_unchanged(gw):
    # (the client's Agent turns Content-Length into response.length)
    resp = await gw.post("/v1/chat/completions", CHAT)
    body = await resp.content()
    assert resp.length == len(body) > 0
    assert resp.headers.getRawHeaders(b"transfer-encoding") is None
    # a stream Lectr rewrites (usage chunk removed) is chunked instead
    response, chunks = await open_stream(gw, "/v1/chat/completions", {**CHAT, "stream": True})
    await chunks.done
    assert response.length is UNKNOWN_LENGTH


@pytest_twisted.ensureDeferred
async def test_provider_auth_errors_do_not_leak_the_org_key(gw):
    """OpenAI's 401 quotes part of the key it was sent; the org's clients
    must not see even that."""
    gw.provider.keys["openai"] = set()  # the provider now refuses the org's key
    resp = await gw.post("/v1/chat/completions", CHAT)
    assert resp.code == 401
    doc = await resp.json()
    assert doc["error"]["message"] == "Incorrect API key provided: ***"
    assert "sk-" not in json.dumps(doc)
    assert resp.headers.getRawHeaders(b"x-fake-provider") == [b"openai"]  # the provider's answer
