"""Providers: error dialects, upstream auth, key validation against a fake
provider on loopback (never a real one)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from lectr.providers import ProviderRegistry
from lectr.providers.base import NO_OPTIONS, NoOptions, scrub
from lectr.providers.catalogue.anthropic import Anthropic
from lectr.providers.catalogue.azure import Azure
from lectr.providers.catalogue.gemini import Gemini
from lectr.providers.catalogue.openai import OpenAI
from lectr.providers.http import make_http_request
from lectr.util.secret import Secret
from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY, FakeProviderServer, Script


@pytest_twisted.async_yield_fixture
async def fake():
    server = await FakeProviderServer.start()
    yield server
    await server.stop()


def test_error_dialects():
    o = json.loads(OpenAI().error_body("authentication", "bad key"))
    assert o == {
        "error": {
            "message": "bad key",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    a = json.loads(Anthropic().error_body("permission", "org disabled", "req_1"))
    assert a == {
        "type": "error",
        "error": {"type": "permission_error", "message": "org disabled"},
        "request_id": "req_1",
    }


def _signed(provider, path: bytes, query: bytes = b"", model=None, options=NO_OPTIONS):
    req = provider.request(b"POST", path, query, model, options, [], b"{}")
    provider.sign(req, Secret("sk-1"), options)
    return req


def test_upstream_requests_with_path_prefix_and_signing():
    req = _signed(OpenAI("http://127.0.0.1:9/openai/"), b"/v1/chat/completions", b"?x=1")
    assert (req.base_url, req.target) == (
        "http://127.0.0.1:9/openai",
        b"/openai/v1/chat/completions?x=1",
    )
    assert req.headers == [(b"Authorization", b"Bearer sk-1")]
    req = _signed(Anthropic(), b"/v1/messages")
    assert (req.base_url, req.target) == ("https://api.anthropic.com", b"/v1/messages")
    assert req.headers == [(b"x-api-key", b"sk-1")]


def test_gemini_and_azure_paths():
    req = _signed(Gemini(), b"/v1/chat/completions")
    assert req.target == b"/v1beta/openai/chat/completions"
    azure = Azure()
    options = NoOptions("https://acme.openai.azure.com", None)
    req = _signed(azure, b"/v1/chat/completions", b"?api-version=x&a=1", "gpt-4o", options)
    assert req.base_url == "https://acme.openai.azure.com"
    assert req.target == b"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&a=1"
    assert req.headers == [(b"api-key", b"sk-1")]
    assert _signed(azure, b"/v1/files", model=None, options=options).target.startswith(
        b"/openai/files?api-version="
    )
    # a deployment name can never become a dot segment or a separator
    # the Responses API is not per deployment (the body's model names it)
    responses = _signed(azure, b"/v1/responses", model="my-dep", options=options).target
    assert responses.startswith(b"/openai/responses?api-version=")
    follow = _signed(azure, b"/v1/responses/resp_1/cancel", model=None, options=options).target
    assert follow.startswith(b"/openai/responses/resp_1/cancel?")
    assert _signed(azure, b"/v1/responsesx", model="d", options=options).target.startswith(
        b"/openai/deployments/d/responsesx?"
    )
    assert b"/deployments/%2E%2E/" in _signed(azure, b"/v1/x", model="..", options=options).target
    assert b"/deployments/a%2Fb/" in _signed(azure, b"/v1/x", model="a/b", options=options).target
    assert azure.check_key_base_url("https://acme.openai.azure.com")
    assert not azure.check_key_base_url("https://evil.example.com")
    with pytest.raises(ValueError):  # no base URL anywhere
        azure.request(b"GET", b"/v1/models", b"", None, NO_OPTIONS, [], None)


def test_registry():
    from lectr.config import load_config

    r = ProviderRegistry.from_config(
        load_config({}, {"LECTR_ANTHROPIC_BASE_URL": "http://127.0.0.1:1/a"})
    )
    assert r.names()[:2] == ["openai", "anthropic"]
    assert set(r.names()) == {
        "openai",
        "anthropic",
        "azure",
        "gemini",
        "mistral",
        "groq",
        "deepseek",
        "xai",
        "openrouter",
        "together",
        "fireworks",
    }
    assert r["anthropic"].base_url == "http://127.0.0.1:1/a"
    assert r.get("nope") is None and "openai" in r
    assert {p.dialect.name for p in r} == {"openai", "anthropic"}
    assert [p.name for p in r if p.dialect.name == "anthropic"] == ["anthropic"]


def test_scrub_removes_key_like_text():
    text = "Incorrect API key provided: sk-proj-abc****wxyz. You can find your key at ..."
    assert "sk-proj" not in scrub(text)
    assert "wxyz" not in scrub("key mysecretvaluewxyz", "mysecretvaluewxyz")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("provider_cls,key", [(OpenAI, OPENAI_KEY), (Anthropic, ANTHROPIC_KEY)])
async def test_validate_good_key(fake, provider_cls, key):
    base = fake.openai_base_url if provider_cls is OpenAI else fake.anthropic_base_url
    p = provider_cls(base)
    result = await p.validate_key(Secret(key), make_http_request(reactor))
    assert (result.valid, result.reachable, result.status) == (True, True, 200)
    [seen] = fake.resource.calls()
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    if provider_cls is Anthropic:
        assert seen.header("x-api-key") == key and seen.header("anthropic-version")
        assert seen.header("authorization") is None
    else:
        assert seen.header("authorization") == f"Bearer {key}"


@pytest_twisted.ensureDeferred
async def test_validate_refused_key_names_the_reason_without_the_key(fake):
    p = OpenAI(fake.openai_base_url)
    result = await p.validate_key(Secret("sk-wrong-0123456789ABCDEF"), make_http_request(reactor))
    assert (result.valid, result.reachable, result.status) == (False, True, 401)
    assert "Incorrect API key" in result.reason
    assert "sk-" not in result.reason


@pytest_twisted.ensureDeferred
async def test_validate_unreachable():
    p = Anthropic("http://127.0.0.1:1")
    result = await p.validate_key(Secret("k" * 20), make_http_request(reactor))
    assert (result.valid, result.reachable) == (False, False)
    assert "could not be reached" in result.reason


@pytest_twisted.ensureDeferred
async def test_validate_never_follows_redirects(fake):
    fake.resource.next(Script(status=302, redirect_to=fake.origin + "/elsewhere"))
    p = OpenAI(fake.openai_base_url)
    result = await p.validate_key(Secret(OPENAI_KEY), make_http_request(reactor))
    assert (result.valid, result.reachable, result.status) == (False, False, 302)
    assert len(fake.resource.calls()) == 1  # the redirect target was never requested


@pytest_twisted.ensureDeferred
async def test_validate_provider_error_is_unreachable(fake):
    fake.resource.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    result = await OpenAI(fake.openai_base_url).validate_key(
        Secret(OPENAI_KEY), make_http_request(reactor)
    )
    assert (result.valid, result.reachable, result.status) == (False, False, 503)
    assert "overloaded" in result.reason


def test_host_header():
    from lectr.providers.base import host_header

    assert host_header("https://api.openai.com") == b"api.openai.com"
    assert host_header("https://api.openai.com:443/x") == b"api.openai.com"
    assert host_header("http://127.0.0.1:9000/anthropic") == b"127.0.0.1:9000"
    assert host_header("http://[::1]:8080") == b"[::1]:8080"


# --- the whole exchange is bounded (connect, headers, body) ------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "script, stage",
    [
        (Script(hang=True), "waiting for the response headers"),
        (Script(stall_after=b'{"data": [{"id": "gpt-'), "reading the response body"),
        # a trickle: a byte every 50 ms never trips an idle timer, only a deadline
        (Script(events=[b" "] * 400, interval=0.05), "reading the response body"),
    ],
    ids=["no-headers", "stalls-mid-body", "trickles"],
)
async def test_validation_is_bounded_by_one_deadline(fake, script, stage):
    fake.resource.next(script)
    started = reactor.seconds()
    result = await OpenAI(fake.openai_base_url).validate_key(
        Secret(OPENAI_KEY), make_http_request(reactor), timeout=0.5
    )
    elapsed = reactor.seconds() - started
    assert 0.5 <= elapsed < 3.0, elapsed
    assert (result.valid, result.reachable, result.status) == (False, False, None)
    assert f"no complete answer within 0.5s ({stage})" in result.reason
    assert f"GET {fake.openai_base_url}/v1/models" in result.reason
    # the connection was closed, not left to the server
    await wait_until(lambda: not fake.resource.open_requests)


@pytest_twisted.ensureDeferred
async def test_a_large_body_is_read_up_to_the_cap(fake):
    from lectr.providers.http import MAX_BODY

    fake.resource.next(Script(body=b"x" * (MAX_BODY + 4096)))
    status, body = await make_http_request(reactor)(
        b"GET",
        fake.openai_base_url.encode() + b"/v1/models",
        {b"authorization": f"Bearer {OPENAI_KEY}".encode()},
        5.0,
    )
    assert (status, len(body)) == (200, MAX_BODY)


@pytest_twisted.ensureDeferred
async def test_a_validation_404_says_what_happened_and_the_url_asked(fake):
    fake.resource.next(Script(status=404, body=b'{"error":{"message":"Unknown path"}}'))
    result = await OpenAI(fake.openai_base_url).validate_key(
        Secret(OPENAI_KEY), make_http_request(reactor)
    )
    assert (result.valid, result.reachable, result.status) == (False, False, 404)
    assert result.reason.startswith(
        f"OpenAI answered 404 Not Found to GET {fake.openai_base_url}/v1/models"
    )
    assert "base URL" in result.reason and "Unknown path" in result.reason
    assert "unreachable" not in result.reason and "could not be reached" not in result.reason


@pytest_twisted.ensureDeferred
async def test_outgoing_connections_do_not_log_factory_start_and_stop(fake):
    from twisted.logger import formatEvent, globalLogPublisher

    from lectr.http.client import Origin, UpstreamClient

    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    class Sink:
        def __init__(self) -> None:
            self.done = Deferred()

        def response_started(self, status, reason, headers, length) -> None:
            self.status = status

        def response_data(self, data) -> None:
            pass

        def response_done(self) -> None:
            self.done.callback(self.status)

        def response_failed(self, error) -> None:
            self.done.errback(Exception(error.kind))

    globalLogPublisher.addObserver(observe)
    client = UpstreamClient(reactor, connect_timeout=5)
    try:
        for _ in range(2):
            await OpenAI(fake.openai_base_url).validate_key(
                Secret(OPENAI_KEY), make_http_request(reactor)
            )
        sink = Sink()  # the proxy's own upstream client
        client.request(Origin.from_url(fake.origin), b"GET", b"/openai/v1/models", [], None, sink)
        assert await sink.done == 401
        await client.close_idle()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(fake.resource.calls()) == 3
    noisy = [line for line in lines if "Starting factory" in line or "Stopping factory" in line]
    assert noisy == []


async def wait_until(predicate, timeout: float = 5.0) -> None:
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02)
