"""A proxied call's lifecycle at its edges (lectr/proxy/call.py, the policy
chain, the handler's drain): each test drives a real Lectr over loopback
against the fake provider (tests/support) - a step timing out, shutdown
during a step, a slow client, requests after the drain, a client leaving
during a fallback."""

from __future__ import annotations

import json

import psycopg2
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from tests.support.fake_provider import Script
from tests.support.lectr_service import proxy_url
from tests.test_routing_proxy import CHAT, close_env, make_env
from tests.test_routing_proxy import env as routing_env

env = routing_env  # the fixture: a Lectr, an org with keys, the fake provider


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


def with_step(env, step, at: int = 2) -> None:
    steps = list(env.c.proxy.steps)
    steps.insert(at, step)
    env.c.proxy.steps = tuple(steps)


def without_step(env, step) -> None:
    env.c.proxy.steps = tuple(s for s in env.c.proxy.steps if s is not step)


def count_rows(db_url: str, request_id: str) -> int:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM request_logs WHERE request_id = %s::uuid", (request_id,)
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def post_chat(e) -> Deferred:
    """A chat request to the proxy, on a connection of its own."""
    return ensureDeferred(
        treq.post(
            proxy_url(e.service, "/v1/chat/completions"),
            data=json.dumps(CHAT).encode(),
            headers={"authorization": [f"Bearer {e.key}"], "content-type": ["application/json"]},
            persistent=False,
        )
    )


async def set_limits(env, body: dict) -> None:
    status, doc = await env.admin("PUT", f"/admin/orgs/{env.org.id}/limits", body)
    assert status == 200, doc
    await env.c.limits.sync()


def fail_open_step(seconds: float):
    """An asynchronous policy step that lets the request through when its
    check fails (a common pattern for an external check: fail open)."""

    async def check() -> None:
        try:
            await deferLater(reactor, seconds)
        except Exception:
            return None  # the check failed: let the request through
        return None

    def step(call):
        return ensureDeferred(check())

    return step


# --- the policy chain and the end of the call ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_step_timeout_with_a_fail_open_step_does_not_leak_its_limits_slot(env, monkeypatch):
    """A step that timed out is cancelled after the call has answered 503; a
    step that fails open on its cancellation answers anyway - the rest of
    the chain (the limits step) must not run for the ended call, or its
    concurrency slot is held for ever."""
    from lectr.proxy import call as call_module

    monkeypatch.setattr(call_module, "STEP_TIMEOUT", 0.3)
    await set_limits(env, {"max_concurrent": 1})
    step = fail_open_step(5.0)
    with_step(env, step)
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 503
    await resp.content()
    await sleep(0.2)
    without_step(env, step)
    resp = await env.post("/v1/chat/completions", CHAT)
    body = await resp.content()
    assert resp.code == 200, body
    assert len(env.provider.calls()) == 1  # the timed-out call never went upstream


@pytest.mark.parametrize("kind", ["hanging", "fail_open"])
@pytest_twisted.ensureDeferred
async def test_shutdown_during_an_asynchronous_step_answers_503_and_sends_nothing(
    db_url, tmp_path, kind
):
    """abort("shutdown") gives a 503 to a request whose answer has not
    started, and nothing goes upstream: the step still running is cancelled
    after the call has ended (cancelled first, a hanging step made the call
    crash with a 500, and a fail-open one let the chain send the request)."""
    e = await make_env(db_url, tmp_path, LECTR_SHUTDOWN_GRACE="0.3")
    stopped = None
    try:
        step = (lambda call: Deferred()) if kind == "hanging" else fail_open_step(30.0)
        with_step(e, step)
        opened = e.c.proxy.client.connections_opened
        request = post_chat(e)
        await sleep(0.2)
        stopped = ensureDeferred(e.service.stopService())
        resp = await request
        doc = json.loads(await resp.content())
        await sleep(0.2)
        # nothing upstream: no request, not even a connection opened for one
        sent = len(e.provider.calls()) + e.c.proxy.client.connections_opened - opened
        assert (resp.code, doc["error"]["code"], sent) == (503, "service_unavailable", 0), doc
    finally:
        if stopped is not None:
            await stopped
        await e.pool.closeCachedConnections()
        await e.fake.stop()


# --- the idle timeout and backpressure ----------------------------------------------------


class SlowReader(Protocol):
    """Reads the first piece, then stops reading for ``pause`` seconds."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.size = 0
        self.paused = False
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()
            reactor.callLater(self.pause, self.transport.resumeProducing)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_slow_client_is_not_cut_as_an_idle_provider(db_url, tmp_path):
    """Backpressure pauses the provider's socket while the client reads
    slowly: the provider is not silent, Lectr stopped reading it. The idle
    timeout must not cut a healthy answer then (nor blame the provider)."""
    e = await make_env(db_url, tmp_path, LECTR_UPSTREAM_IDLE_TIMEOUT="0.5")
    try:
        size = 32 * 1024 * 1024
        e.provider.next(
            Script(body=b"x" * size, headers={"content-type": "application/octet-stream"})
        )
        response = await Agent(reactor).request(
            b"GET",
            proxy_url(e.service, "/openai/v1/files/file-1/content").encode(),
            Headers({"authorization": [f"Bearer {e.key}"]}),
        )
        assert response.code == 200
        reader = SlowReader(pause=1.5)
        response.deliverBody(reader)
        await reader.done
        [row] = await e.rows()
        assert row["error_type"] is None, row  # was: upstream_idle_timeout
        assert reader.reason.check(ResponseDone), (reader.reason, reader.size)
        assert reader.size == size
    finally:
        await close_env(e)


# --- shutdown ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_request_is_proxied_after_the_proxy_has_drained(db_url, tmp_path):
    """Shutdown drains in-flight requests, then stops the recorder: a
    keep-alive connection must not carry a new request upstream afterwards
    (the provider would serve and bill it, and its row would be dropped)."""
    e = await make_env(db_url, tmp_path, LECTR_SHUTDOWN_GRACE="0.3")
    url = proxy_url(e.service, "/v1/chat/completions")
    headers = {"authorization": [f"Bearer {e.key}"], "content-type": ["application/json"]}
    try:
        resp = await treq.post(url, data=json.dumps(CHAT).encode(), headers=headers, pool=e.pool)
        assert resp.code == 200
        await resp.content()  # the connection goes back to the pool, open
        await e.service.stopService()
        calls = len(e.provider.calls())
        try:
            resp = await treq.post(
                url, data=json.dumps(CHAT).encode(), headers=headers, pool=e.pool
            )
            code = resp.code
            await resp.content()
            rid = resp.headers.getRawHeaders(b"x-lectr-request-id")[0].decode()
        except Exception:
            code = rid = None  # the connection was closed: nothing proxied
        rows = await deferToThread(count_rows, db_url, rid) if rid else None
        # (today: 200, the provider called, and no row: the recorder had stopped)
        assert len(e.provider.calls()) == calls, (code, rows)
    finally:
        await e.pool.closeCachedConnections()
        await e.fake.stop()


@pytest_twisted.ensureDeferred
async def test_an_attempt_cut_by_shutdown_is_counted_cancelled_not_an_upstream_error(
    db_url, tmp_path
):
    """A request waiting for its provider when the drain's grace runs out
    gets a 503; its attempt was cancelled by Lectr, not failed by the
    provider: counted as such (each deploy added to the upstream error rate
    that LectrUpstreamErrors alerts on)."""
    e = await make_env(db_url, tmp_path, LECTR_SHUTDOWN_GRACE="0.3")
    try:
        e.provider.next(Script(hang=True))
        request = post_chat(e)
        for _ in range(100):
            if e.provider.calls():
                break
            await sleep(0.02)
        await e.service.stopService()
        resp = await request
        await resp.content()
        assert resp.code == 503
        attempts = e.c.metrics.get("lectr_upstream_attempts_total")
        assert attempts.value("openai", "cancelled") == 1
        assert attempts.value("openai", "error") == 0
    finally:
        await e.fake.stop()


# --- a disconnect between attempts (pins behaviour no other test covers) ----------------


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_a_fallback_attempt_cancels_it_and_cools_no_key(env):
    await env.route(
        "smart",
        targets=[
            {"provider": "openai", "model": "gpt-4o"},
            {"provider": "groq", "model": "llama-3.3-70b"},
        ],
    )
    env.provider.next(Script(status=503, body=b'{"error":{"message":"overloaded"}}'))
    env.provider.next(Script(hang=True))  # the fallback waits for its headers
    request = ensureDeferred(env.post("/v1/chat/completions", {**CHAT, "model": "smart"}))
    for _ in range(100):
        if len(env.provider.calls()) == 2:
            break
        await sleep(0.02)
    request.cancel()  # the client goes away while attempt 2 waits
    with pytest.raises(Exception):  # noqa: B017 - the client gave up
        await request
    for _ in range(100):
        if env.provider.cancelled == 1:
            break
        await sleep(0.02)
    assert env.provider.cancelled == 1  # the fallback's upstream request was cancelled
    assert env.c.proxy.active == set()
    [row] = await env.rows()
    assert (row["status"], row["error_type"], row["attempts"], row["provider"]) == (
        499,
        "client_disconnected",
        2,
        "groq",
    )
    assert [f["reason"] for f in row["fallbacks"]] == ["5xx"]
    assert row["usage_source"] == "estimated"  # it was sent: never "nothing"
    keys = (await env.admin("GET", f"/admin/orgs/{env.org.id}/provider-keys"))[1]["items"]
    assert all(k.get("cooldown") is None for k in keys)  # a 5xx and a hang-up cool no key


@pytest_twisted.ensureDeferred
async def test_healthz_fails_once_draining_begins_even_on_an_open_connection(db_url, tmp_path):
    """A load balancer that checks /healthz over a kept-alive connection
    must see a draining node fail (503, and the connection closed), or it
    keeps sending it requests that are refused; before, it answered 200."""
    e = await make_env(db_url, tmp_path, LECTR_SHUTDOWN_GRACE="2")
    health = proxy_url(e.service, "/healthz")
    try:
        first = await treq.get(health, pool=e.pool)
        assert first.code == 200 and json.loads(await first.content()) == {"status": "ok"}
        e.provider.stream_interval = 0.2  # a request in flight keeps the drain going
        slow = treq.post(
            proxy_url(e.service, "/v1/chat/completions"),
            data=json.dumps({**CHAT, "stream": True}).encode(),
            headers={"authorization": [f"Bearer {e.key}"], "content-type": ["application/json"]},
            persistent=False,
        )
        await deferLater(reactor, 0.3)
        stopping = e.service.stopService()
        await deferLater(reactor, 0.2)  # (the ports close first, then the drain begins)
        assert not stopping.called
        resp = await treq.get(health, pool=e.pool)  # the same, kept-alive connection
        assert resp.code == 503
        assert json.loads(await resp.content()) == {"status": "stopping"}
        # the connection was closed after it (and the port listens no more)
        with pytest.raises(ConnectError):
            await treq.get(health, pool=e.pool)
        await (await slow).content()
        await stopping
    finally:
        await e.pool.closeCachedConnections()
        await e.fake.stop()
