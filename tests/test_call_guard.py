"""One guard ends every call exactly once: whatever raises - a policy step
synchronously or in its Deferred, a step answering nonsense, a step that
never answers, the recorder, a callback of the upstream client - the client
gets one answer in its route's dialect (or an aborted connection once the
answer started), the request gets one log row and leaves the active set."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from lectr.policy.chain import Refusal
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # the fixture: a Lectr, an org with keys, the fake provider


class Boom(Exception):
    pass


def raising(call):
    raise Boom("a step that raises")


def failing_later(call):
    d = Deferred()
    reactor.callLater(0.01, d.errback, Boom("an asynchronous step that fails"))
    return d


def nonsense(call):
    return succeed("not a refusal")


def refusing_later(call):
    return deferLater(reactor, 0.01, lambda: Refusal(403, "permission", "Not today."))


def with_step(env, step) -> None:
    steps = list(env.c.proxy.steps)
    steps.insert(2, step)
    env.c.proxy.steps = tuple(steps)


async def ended_once(env, resp) -> dict:
    rid = resp.headers.getRawHeaders(b"x-lectr-request-id")[0].decode()
    assert env.c.proxy.active == set()
    rows = [r for r in await env.rows() if r["request_id"] == rid]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("step", [raising, failing_later, nonsense])
@pytest_twisted.ensureDeferred
async def test_a_broken_step_ends_the_call_with_a_500_in_the_dialect(env, step):
    with_step(env, step)
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 500
    doc = json.loads(await resp.content())
    assert doc["error"]["code"] == "internal_error"
    row = await ended_once(env, resp)
    assert (row["status"], row["error_type"], row["attempts"]) == (500, "internal", 0)
    assert env.provider.calls() == []
    resp = await env.post(
        "/anthropic/v1/messages",
        {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.code == 500
    assert json.loads(await resp.content())["error"]["type"] == "api_error"


@pytest_twisted.ensureDeferred
async def test_an_asynchronous_refusal_is_an_answer(env):
    with_step(env, refusing_later)
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 403
    assert json.loads(await resp.content())["error"]["message"] == "Not today."
    row = await ended_once(env, resp)
    assert row["model"] == "gpt-4o-mini" and row["streamed"] is False  # what the request asked


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_during_an_asynchronous_step_cancels_it(env):
    cancelled = []

    def hanging(call):
        return Deferred(lambda d: cancelled.append(True))

    with_step(env, hanging)
    request = ensureDeferred(env.post("/v1/chat/completions", CHAT))
    await deferLater(reactor, 0.2)
    request.cancel()
    with pytest.raises(Exception):  # noqa: B017 - the client gave up
        await request
    await deferLater(reactor, 0.2)
    assert cancelled == [True]
    assert env.c.proxy.active == set()
    [row] = await env.rows()
    assert row["status"] == 499


@pytest_twisted.ensureDeferred
async def test_a_failing_recorder_still_ends_the_call(env):
    def broken(record):
        raise Boom("the recorder")

    env.c.proxy.recorder.record = broken
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 200
    await resp.content()
    assert env.c.proxy.active == set()


@pytest_twisted.ensureDeferred
async def test_a_crash_after_the_answer_started_aborts_the_connection(env):
    calls = {"n": 0}

    def boom_on_data(self, data):
        calls["n"] += 1
        raise Boom("the relay")

    from lectr.proxy import call as call_module

    meter_feed = call_module.Call.response_data
    call_module.Call.response_data = call_module.guarded(boom_on_data)
    try:
        # the head may still sit in the socket buffer when the connection is
        # aborted: either way the client can tell the answer is not complete
        with pytest.raises((ResponseFailed, ResponseNeverReceived)):
            resp = await env.post("/v1/chat/completions", {**CHAT, "stream": True})
            await resp.content()
    finally:
        call_module.Call.response_data = meter_feed
    assert calls["n"] >= 1
    assert env.c.proxy.active == set()
    [row] = await env.rows()
    assert row["error_type"] == "internal"


@pytest_twisted.ensureDeferred
async def test_a_step_that_never_answers_times_out_with_503(env, monkeypatch):
    from lectr.proxy import call as call_module

    monkeypatch.setattr(call_module, "STEP_TIMEOUT", 0.3)
    cancelled = []
    with_step(env, lambda call: Deferred(lambda d: cancelled.append(True)))
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 503
    assert "did not answer in time" in json.loads(await resp.content())["error"]["message"]
    assert cancelled == [True]
    await ended_once(env, resp)
