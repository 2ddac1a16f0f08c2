"""Policy-based routing end to end: key pools, routes with fallbacks, cache
affinity, the provider catalogue - real LectrService, real PostgreSQL, real
HTTP to a fake provider that fails on command and checks every key."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from tests.support.fake_provider import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    FakeProviderServer,
    Script,
    openai_chat_stream,
)
from tests.support.lectr_service import admin_url, proxy_url, start_lectr
from tests.test_target import HOSTILE

OPENAI_KEY_2 = "sk-test-openai-second-0123456789ab"
OPENAI_KEY_3 = "sk-test-openai-third-0123456789abc"
GROQ_KEY = "gsk_test_groq_0123456789abcdefgh"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
ADMIN = {"authorization": ["Bearer test-admin-token-0123456789"]}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    def __init__(self, service, fake, org, key) -> None:
        self.service = service
        self.c = service.components
        self.fake = fake
        self.provider = fake.resource
        self.org = org
        self.key = key
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8

    async def post(
        self, path: str, body, headers=None, key=None, raw=False, ctype="application/json"
    ):
        h = {"content-type": [ctype], "authorization": [f"Bearer {key or self.key}"]}
        for name, value in (headers or {}).items():
            h[name] = [value]
        data = body if raw else json.dumps(body).encode()
        return await treq.post(proxy_url(self.service, path), data=data, headers=h, pool=self.pool)

    async def admin(self, method: str, path: str, body=None):
        resp = await treq.request(
            method,
            admin_url(self.service, path),
            data=json.dumps(body).encode() if body is not None else None,
            headers={**ADMIN, "content-type": ["application/json"]},
            persistent=False,
        )
        text = await resp.text()
        return resp.code, json.loads(text) if text else None

    async def add_key(self, provider: str, key: str, **options) -> None:
        """A key for the org's pool (its validation call is forgotten)."""
        await self.c.vault.add_key(self.org.id, provider, key, **options)
        self.provider.reset()

    async def route(self, name: str, **spec) -> None:
        status, doc = await self.admin("PUT", f"/admin/orgs/{self.org.id}/routes/{name}", spec)
        assert status in (200, 201), doc

    async def rows(self) -> list[dict]:
        await self.c.recorder.flush_now()
        page = await self.c.usage.recent_requests(self.org.id, limit=200)
        return [e.to_json() for e in page.items]

    def keys_used(self, provider: str | None = None) -> list[str]:
        out = []
        for call in self.provider.calls(provider):
            auth = call.header("authorization") or ""
            out.append(auth.removeprefix("Bearer ") or call.header("api-key") or "")
        return out


async def make_env(db_url, tmp_path, **settings) -> Env:
    """Lectr (extra settings as environment variables) in front of the fake
    provider, with the org Acme: an OpenAI, a Groq and an Anthropic key."""
    fake = await FakeProviderServer.start()
    fake.resource.keys.update(
        {
            "openai": {OPENAI_KEY, OPENAI_KEY_2, OPENAI_KEY_3},
            "groq": {GROQ_KEY},
            "azure": {AZURE_KEY},
            "anthropic2": {ANTHROPIC_KEY},
        }
    )
    service = await start_lectr(
        db_url,
        tmp_path,
        fake,
        LECTR_GROQ_BASE_URL=fake.origin + "/groq",
        LECTR_KEY_BASE_URL_HOSTS="127.0.0.1",
        **settings,
    )
    c = service.components
    org, issued = await c.orgs.create_org("Acme")
    await c.vault.add_key(org.id, "openai", OPENAI_KEY, name="main")
    await c.vault.add_key(org.id, "groq", GROQ_KEY, name="groq")
    await c.vault.add_key(org.id, "anthropic", ANTHROPIC_KEY, name="main")
    fake.resource.reset()
    return Env(service, fake, org, issued.plaintext.reveal())


async def close_env(e: Env) -> None:
    await e.pool.closeCachedConnections()
    await e.service.stopService()
    await e.fake.stop()


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await make_env(db_url, tmp_path)
    try:
        yield e
    finally:
        await close_env(e)


def route_header(resp) -> dict:
    [value] = resp.headers.getRawHeaders(b"x-lectr-route")
    return dict(part.strip().split("=", 1) for part in value.decode().split(";"))


# --- the fallback matrix ----------------------------------------------------------------


async def _dead_provider(env: Env) -> None:
    status, doc = await env.admin(
        "POST",
        "/admin/providers",
        {"name": "dead", "dialect": "openai", "base_url": f"http://127.0.0.1:{closed_port()}"},
    )
    assert status == 201, doc
    # keys are checked with their provider before storage: store this one directly
    from lectr.storage.provider_keys import NewProviderKey
    from lectr.vault.crypto import Binding

    vault = env.c.vault
    sealed = vault._keyring.seal(
        Binding(env.org.id, "dead", "0" * 8 + "-0000-4000-8000-" + "0" * 12), b"sk-dead-0123456789"
    )
    await vault._store.insert(
        NewProviderKey(
            id="0" * 8 + "-0000-4000-8000-" + "0" * 12,
            org_id=env.org.id,
            provider="dead",
            name="dead",
            last4="6789",
            ciphertext=sealed.ciphertext,
            nonce=sealed.nonce,
            wrapped_dek=sealed.wrapped_dek,
            dek_nonce=sealed.dek_nonce,
            kek_id=sealed.kek_id,
        )
    )
    await vault._refresh(env.org.id)


TRIGGERS = {
    "connect": None,  # the first target's port is closed
    "timeout": Script(hang=True),
    "429": Script(status=429, headers={"retry-after": "7"}, body=b'{"error":{"message":"slow"}}'),
    "500": Script(status=500, body=b'{"error":{"message":"boom"}}'),
    "502": Script(status=502, body=b"bad gateway"),
    "503": Script(status=503, body=b'{"error":{"message":"overloaded"}}'),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
@pytest_twisted.ensureDeferred
async def test_each_trigger_falls_back_and_the_client_sees_one_clean_answer(env, trigger):
    first = "dead" if trigger == "connect" else "openai"
    if trigger == "connect":
        await _dead_provider(env)
    else:
        env.provider.next(TRIGGERS[trigger])
    await env.route(
        "smart",
        targets=[
            {"provider": first, "model": "gpt-4o"},
            {"provider": "groq", "model": "llama-3.3-70b"},
        ],
        attempt_timeout=0.5,
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    doc = json.loads(await resp.content())
    assert resp.code == 200, doc
    assert doc["choices"][0]["message"]["content"] == "Hello!"
    assert route_header(resp) == {
        "route": "smart",
        "provider": "groq",
        "model": "llama-3.3-70b",
        "key": "groq",
        "attempt": "2",
    }
    groq = env.provider.calls("groq")
    assert len(groq) == 1 and groq[0].json()["model"] == "llama-3.3-70b"
    [row] = await env.rows()
    assert (row["route"], row["provider"], row["attempts"], row["status"]) == (
        "smart",
        "groq",
        2,
        200,
    )
    reason = {"500": "5xx", "502": "5xx", "503": "5xx"}.get(trigger, trigger)
    assert row["fallbacks"][0]["reason"] == reason
    assert row["fallbacks"][0]["provider"] == first
    if trigger == "429":  # the rate-limited key cools down for its retry-after
        keys = (await env.admin("GET", f"/admin/orgs/{env.org.id}/provider-keys"))[1]["items"]
        [main] = [k for k in keys if k["provider"] == "openai"]
        assert main["cooldown"]["reason"] == "rate_limited (429)"


@pytest_twisted.ensureDeferred
async def test_a_key_the_provider_refuses_falls_back_to_the_next_key_of_the_pool(env):
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    env.provider.keys["openai"] = {OPENAI_KEY_2}  # the provider now refuses the first key
    codes = []
    for _ in range(4):
        resp = await env.post("/v1/chat/completions", CHAT)
        codes.append(resp.code)
        await resp.content()
    assert codes == [200] * 4
    # one refusal at most: the refused key is set aside, later requests go straight to the other
    assert env.keys_used("openai").count(OPENAI_KEY) == 1
    keys = (await env.admin("GET", f"/admin/orgs/{env.org.id}/provider-keys"))[1]["items"]
    [main] = [k for k in keys if k["name"] == "main" and k["provider"] == "openai"]
    assert main["cooldown"]["reason"] == "refused (401)"


@pytest_twisted.ensureDeferred
async def test_a_stream_that_failed_after_its_first_byte_is_not_retried(env):
    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "a"}, {"provider": "groq", "model": "b"}],
    )
    env.provider.next(
        Script(events=openai_chat_stream("a", ["x"] * 6, True), drop_after=2, interval=0.05)
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart", "stream": True})
    assert resp.code == 200
    with pytest.raises(ResponseFailed):  # a truncated stream, never a clean end
        await resp.content()
    assert len(env.provider.calls()) == 1  # never duplicated to the second target
    [row] = await env.rows()
    assert (row["attempts"], row["error_type"]) == (1, "upstream_dropped")


@pytest_twisted.ensureDeferred
async def test_a_400_from_the_provider_is_final(env):
    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "a"}, {"provider": "groq", "model": "b"}],
    )
    env.provider.next(Script(status=400, body=b'{"error":{"message":"bad"}}'))
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    assert resp.code == 400
    await resp.content()
    assert len(env.provider.calls()) == 1


@pytest_twisted.ensureDeferred
async def test_max_attempts_holds_and_the_last_answer_says_do_not_retry(env):
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    await env.route(
        "smart",
        targets=[
            {"provider": "openai", "model": "a"},
            {"provider": "groq", "model": "b"},
            {"provider": "openai", "model": "c"},
        ],
        max_attempts=2,
    )
    for _ in range(3):
        env.provider.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    assert resp.code == 503
    assert resp.headers.getRawHeaders(b"x-should-retry") == [b"false"]
    await resp.content()
    assert len(env.provider.calls()) == 2


@pytest_twisted.ensureDeferred
async def test_the_openai_sdks_retries_do_not_multiply_lectrs_attempts(env):
    """Lectr's last answer after a fallback carries x-should-retry: false, so
    the SDK's own retries (2 by default) do not run the route again: at most
    max_attempts upstream calls per SDK call."""
    from openai import APIStatusError, OpenAI

    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "a"}, {"provider": "groq", "model": "b"}],
    )
    for _ in range(10):
        env.provider.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    client = OpenAI(base_url=proxy_url(env.service, "/v1"), api_key=env.key)

    def call():
        with pytest.raises(APIStatusError) as e:
            client.chat.completions.create(
                model="smart", messages=[{"role": "user", "content": "x"}]
            )
        return e.value.status_code

    assert await deferToThread(call) == 503
    assert len(env.provider.calls()) == 2  # the route's 2 attempts, once


# --- spread, cool-downs, affinity ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_weighted_spread_over_a_pool(env):
    await env.add_key("openai", OPENAI_KEY_2, name="second", weight=3)
    for _ in range(1000):
        resp = await env.post("/v1/chat/completions", CHAT)
        assert resp.code == 200
        await resp.content()
    used = Counter(env.keys_used("openai"))
    assert abs(used[OPENAI_KEY] - 250) <= 50 and abs(used[OPENAI_KEY_2] - 750) <= 50


@pytest_twisted.ensureDeferred
async def test_a_cooled_down_key_comes_back_after_its_cooldown(env):
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    env.provider.next(Script(status=429, headers={"retry-after": "1"}, body=b"{}"))
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 200  # the other key answered
    await resp.content()
    cooled = env.keys_used("openai")[0]
    env.provider.reset()
    for _ in range(6):
        await (await env.post("/v1/chat/completions", CHAT)).content()
    assert cooled not in env.keys_used("openai")
    await deferLater(reactor, 1.2)
    env.provider.reset()
    for _ in range(6):
        await (await env.post("/v1/chat/completions", CHAT)).content()
    assert cooled in env.keys_used("openai")


@pytest_twisted.ensureDeferred
async def test_cache_affinity_keeps_each_conversation_on_one_key(env):
    """200 conversations of 5 turns over a 3-key pool (weights 1:1:2): every
    turn of a conversation uses its first turn's key, conversations spread
    within 10 percentage points of the weights, and when one key cools down
    only its conversations move."""
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    await env.add_key("openai", OPENAI_KEY_3, name="third", weight=2)
    weights = {OPENAI_KEY: 0.25, OPENAI_KEY_2: 0.25, OPENAI_KEY_3: 0.5}

    async def turn(conv: int) -> str:
        env.provider.reset()
        resp = await env.post("/v1/chat/completions", {**CHAT, "user": f"user-{conv}"})
        assert resp.code == 200
        await resp.content()
        return env.keys_used("openai")[0]

    seen: dict[int, set[str]] = defaultdict(set)
    for _ in range(5):
        for conv in range(200):
            seen[conv].add(await turn(conv))
    assert all(len(keys) == 1 for keys in seen.values())
    first = {conv: next(iter(keys)) for conv, keys in seen.items()}
    share = Counter(first.values())
    for key, weight in weights.items():
        assert abs(share[key] / 200 - weight) <= 0.10, share
    # one key cools down: only the conversations it held move
    [cooled] = [k for k in env.c.vault.pool(env.org.id, "openai") if k.name == "third"]
    env.c.health.cool(cooled.id, "openai", 429, 600)
    for conv in range(200):
        key = await turn(conv)
        if first[conv] != OPENAI_KEY_3:
            assert key == first[conv]
        else:
            assert key != OPENAI_KEY_3


# --- the catalogue through /v1 and the SDKs -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openai_sdk_calls_a_route_and_a_provider_prefixed_model(env):
    from openai import OpenAI

    await env.route("cheap", targets=[{"provider": "groq", "model": "llama-3.1-8b-instant"}])
    client = OpenAI(base_url=proxy_url(env.service, "/v1"), api_key=env.key, max_retries=0)

    def call(model):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "x"}]
        )
        return raw.headers["x-lectr-route"], raw.parse().choices[0].message.content

    header, text = await deferToThread(call, "cheap")
    assert text == "Hello!" and "route=cheap; provider=groq; model=llama-3.1-8b-instant" in header
    header, _ = await deferToThread(call, "groq/llama-3.3-70b-versatile")
    assert "route=-; provider=groq; model=llama-3.3-70b-versatile" in header
    sent = [c.json()["model"] for c in env.provider.calls("groq")]
    assert sent == ["llama-3.1-8b-instant", "llama-3.3-70b-versatile"]


@pytest_twisted.ensureDeferred
async def test_anthropic_sdk_uses_a_route_of_anthropic_targets(env):
    from anthropic import Anthropic

    status, doc = await env.admin(
        "POST",
        "/admin/providers",
        {
            "name": "claude-eu",
            "dialect": "anthropic",
            "base_url": env.fake.origin + "/anthropic2",
            "auth": "x-api-key",
        },
    )
    assert status == 201, doc
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {"provider": "claude-eu", "key": ANTHROPIC_KEY, "name": "eu"},
    )
    assert status == 201, doc
    await env.route(
        "claude",
        targets=[
            {"provider": "anthropic", "model": "claude-sonnet-4-5"},
            {"provider": "claude-eu", "model": "claude-sonnet-4-5-eu"},
        ],
    )
    env.provider.reset()
    env.provider.next(
        Script(
            status=529, body=b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}'
        )
    )
    client = Anthropic(base_url=proxy_url(env.service, ""), api_key=env.key, max_retries=0)

    def call():
        raw = client.messages.with_raw_response.create(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
        return raw.headers["x-lectr-route"], raw.parse().content[0].text

    header, text = await deferToThread(call)
    assert text == "Hello!" and "provider=claude-eu" in header and "attempt=2" in header
    # an anthropic route cannot be called in the OpenAI dialect
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "claude"})
    assert resp.code == 400
    await resp.content()


@pytest_twisted.ensureDeferred
async def test_azure_keys_name_their_resource_and_deployment(env):
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {
            "provider": "azure",
            "key": AZURE_KEY,
            "base_url": env.fake.origin + "/azure",
            "api_version": "2024-10-21",
        },
    )
    assert status == 201, doc
    env.provider.reset()
    # org admins cannot point a key anywhere else
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {"provider": "azure", "key": AZURE_KEY, "base_url": "https://evil.example.com"},
    )
    assert status == 400 and "azure.com" in doc["error"]["message"]
    # nor give a base URL to a provider whose keys have none, even to a host
    # the operator allowed (env: LECTR_KEY_BASE_URL_HOSTS=127.0.0.1)
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {"provider": "openai", "key": OPENAI_KEY_2, "base_url": env.fake.origin + "/openai"},
    )
    assert (status, doc["error"]["message"]) == (400, "OpenAI keys cannot carry a base_url")
    resp = await env.post("/azure/v1/chat/completions", {**CHAT, "model": "my-gpt4o"})
    assert resp.code == 200
    await resp.content()
    [call] = env.provider.calls("azure")
    assert call.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert call.query == "api-version=2024-10-21"
    assert call.header("api-key") == AZURE_KEY and call.header("authorization") is None


@pytest_twisted.ensureDeferred
async def test_explain_shows_the_plan_without_calling_anyone(env):
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "gpt-4o"}, {"provider": "groq", "model": "l"}],
    )
    status, doc = await env.admin(
        "POST", f"/admin/orgs/{env.org.id}/routes/explain", {"body": {"model": "smart"}}
    )
    assert status == 200, doc
    assert doc["route"]["name"] == "smart" and doc["refusal"] is None
    assert [(a["provider"], a["model"]) for a in doc["attempts"]] == [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o"),
        ("groq", "l"),
    ]
    status, doc = await env.admin(
        "POST", f"/admin/orgs/{env.org.id}/routes/explain", {"body": {"model": "mistral/x"}}
    )
    assert doc["refusal"]["status"] == 403 and "No Mistral AI key" in doc["refusal"]["message"]
    assert env.provider.calls() == []


@pytest_twisted.ensureDeferred
async def test_explain_lists_the_attempts_the_proxy_makes_with_one_key(env):
    """Two targets of one provider whose pool has a single key: a 5xx on the
    first falls back to the second with the same key, and explain says so."""
    await env.route(
        "twins",
        targets=[{"provider": "openai", "model": "a"}, {"provider": "openai", "model": "b"}],
    )
    status, doc = await env.admin(
        "POST", f"/admin/orgs/{env.org.id}/routes/explain", {"body": {"model": "twins"}}
    )
    assert status == 200, doc
    explained = [(a["model"], a["key"]["name"]) for a in doc["attempts"]]
    assert explained == [("a", "main"), ("b", "main")]
    env.provider.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "twins"})
    assert resp.code == 200
    await resp.content()
    sent = [
        (c.json()["model"], key)
        for c, key in zip(env.provider.calls(), env.keys_used(), strict=True)
    ]
    assert sent == [("a", OPENAI_KEY), ("b", OPENAI_KEY)]


@pytest_twisted.ensureDeferred
async def test_policy_applies_to_every_target(env):
    status, _ = await env.admin(
        "PUT", f"/admin/orgs/{env.org.id}/providers/openai", {"blocked_models": ["gpt-4o"]}
    )
    assert status == 200
    await env.route(
        "smart",
        targets=[{"provider": "openai", "model": "gpt-4o"}, {"provider": "groq", "model": "l"}],
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "smart"})
    assert resp.code == 200 and route_header(resp)["provider"] == "groq"
    await resp.content()
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o"})
    assert resp.code == 403
    await resp.content()


# --- hostile paths ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hostile_paths_are_400_with_no_upstream_call(env):
    from tests.test_proxy import raw_http

    port = env.c.proxy_port.port.getHost().port
    for path in HOSTILE:
        request = (
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + env.key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        out = await deferToThread(raw_http, port, request)
        assert out.startswith(b"HTTP/1.1 400 "), (path, out[:200])
    assert env.provider.calls() == []
    assert env.c.proxy.active == set()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("model", ["smart", "groq/llama-3.1-8b-instant"])
async def test_a_form_body_cannot_be_routed_to_another_model(env, model):
    """A URL-encoded body's model cannot be rewritten in place: a route or a
    provider/model name that would change it gets a 400 before any upstream
    call (never a 500); the same body with a plain model passes."""
    await env.route("smart", targets=[{"provider": "openai", "model": "gpt-4o"}])
    form = "application/x-www-form-urlencoded"
    resp = await env.post(
        "/v1/chat/completions", f"model={model}&x=1".encode(), raw=True, ctype=form
    )
    assert resp.code == 400
    doc = json.loads(await resp.content())
    assert doc["error"]["type"] == "invalid_request_error"
    assert "cannot be rewritten" in doc["error"]["message"]
    assert env.provider.calls() == []
    resp = await env.post("/v1/chat/completions", b"model=gpt-4o&x=1", raw=True, ctype=form)
    assert resp.code == 200
    await resp.content()
    assert [c.body for c in env.provider.calls()] == [b"model=gpt-4o&x=1"]


@pytest_twisted.ensureDeferred
async def test_no_attempt_is_sent_once_the_headers_deadline_has_passed(db_url, tmp_path):
    """LECTR_UPSTREAM_HEADERS_TIMEOUT bounds the whole request's wait for
    headers, fallbacks included: once it has passed, the route's remaining
    targets are not called (a provider would process, and bill, a request
    whose answer Lectr could no longer wait for)."""
    env = await make_env(db_url, tmp_path, LECTR_UPSTREAM_HEADERS_TIMEOUT="0.6")
    try:
        await env.route(
            "slow",
            targets=[{"provider": "openai", "model": m} for m in ("a", "b", "c", "d")],
            retry_on=["timeout"],
            max_attempts=4,
            attempt_timeout=0.4,
        )
        for _ in range(4):
            env.provider.next(Script(hang=True))
        resp = await env.post("/v1/chat/completions", {**CHAT, "model": "slow"})
        doc = json.loads(await resp.content())
        assert resp.code == 504 and doc["error"]["code"] == "upstream_timeout", doc
        # a: 0.4 s; b: the 0.2 s left; then the deadline: c and d never go out
        assert [c.json()["model"] for c in env.provider.calls()] == ["a", "b"]
        [row] = await env.rows()
        assert row["attempts"] == 2 and row["error_type"] == "upstream_timeout"
    finally:
        await close_env(env)


@pytest_twisted.ensureDeferred
async def test_explain_and_the_proxy_pick_the_same_key_for_a_long_session(env):
    """Only the first 512 bytes of x-lectr-session count, in the proxy and in
    explain alike: explain names the key the proxy then uses."""
    await env.add_key("openai", OPENAI_KEY_2, name="second")
    await env.add_key("openai", OPENAI_KEY_3, name="third")
    names = {OPENAI_KEY: "main", OPENAI_KEY_2: "second", OPENAI_KEY_3: "third"}
    for i in range(10):
        session = f"conversation-{i}-" + "x" * 600
        explained = []
        for value in (session, session[:512]):
            status, doc = await env.admin(
                "POST",
                f"/admin/orgs/{env.org.id}/routes/explain",
                {"body": CHAT, "headers": {"x-lectr-session": value}},
            )
            assert status == 200, doc
            explained.append(doc["attempts"][0]["key"]["name"])
        resp = await env.post("/v1/chat/completions", CHAT, headers={"x-lectr-session": session})
        assert resp.code == 200
        await resp.content()
        used = names[env.keys_used("openai")[-1]]
        assert explained == [used, used], (i, explained, used)


@pytest_twisted.ensureDeferred
async def test_a_route_or_a_provider_of_another_dialect_is_refused_with_a_clear_400(env):
    """Lectr does not translate between dialects: an Anthropic route called
    with an OpenAI-style request (and an Anthropic model named on /v1 chat
    completions) gets a 400 that says what to do, with no upstream call."""
    await env.route("claude", targets=[{"provider": "anthropic", "model": "claude-x"}])
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "claude"})
    doc = json.loads(await resp.content())
    assert resp.code == 400
    assert doc["error"]["message"] == (
        "Route 'claude' sends Anthropic-style requests; call it through an Anthropic-style "
        "path, not this one."
    )
    resp = await env.post("/v1/chat/completions", {**CHAT, "model": "anthropic/claude-x"})
    doc = json.loads(await resp.content())
    assert resp.code == 400
    assert doc["error"]["message"] == (
        "Anthropic speaks the Anthropic API; send 'anthropic/…' models in Anthropic-style "
        "requests, not in OpenAI-style ones."
    )
    assert env.provider.calls() == []
