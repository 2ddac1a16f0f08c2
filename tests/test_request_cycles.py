"""A finished request leaves no reference cycle behind: what a request
allocated is freed by reference counting the moment it ends, whatever its
outcome, so the cyclic garbage collector finds nothing of a request's to
collect. (One cycle - the server's request holding its Call, the Call holding
the request - made every request's ~35 objects cyclic garbage: the collector
then took ~22 µs of each request's ~250 µs of CPU at c=32, docs/performance.md.)

Each outcome a proxied request can have runs twice with the collector saving
what it finds (``gc.DEBUG_SAVEALL``); then no object of a type of Lectr's may
be among it. A closed connection's own objects (the server protocol and its
parser, an upstream connection's protocol and factory) are once per
connection, not per request, and are left out, as are the admin port's
requests (twisted.web's, whose request and channel refer to each other)."""

from __future__ import annotations

import collections
import gc
import json
from io import BytesIO

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from tests.support.fake_provider import Script, sse
from tests.support.lectr_service import proxy_url
from tests.test_proxy import Chunks, eventually
from tests.test_routing_proxy import CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # the fixture: a Lectr, an org with keys, the fake provider

PER_CONNECTION = {
    "lectr.http.server.ServerProtocol",
    "lectr.http.client._UpstreamProtocol",
    "lectr.http.client._ConnFactory",
}
MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


async def drained(resp) -> int:
    await resp.content()
    return resp.code


async def stream(env, body: dict, *, hang_up: bool = False) -> None:
    h = Headers({"content-type": ["application/json"], "authorization": [f"Bearer {env.key}"]})
    response = await Agent(reactor).request(
        b"POST",
        proxy_url(env.service, "/v1/chat/completions").encode(),
        h,
        FileBodyProducer(BytesIO(json.dumps(body).encode())),
    )
    chunks = Chunks()
    response.deliverBody(chunks)
    if hang_up:
        await eventually(lambda: chunks.chunks)
        chunks.transport.stopProducing()  # the client goes away mid-stream
    else:
        await chunks.done


def raising_step(call):
    raise RuntimeError("a step that raises")


async def every_outcome(env) -> None:
    p = env.provider
    assert await drained(await env.post("/v1/chat/completions", CHAT)) == 200
    await stream(env, {**CHAT, "stream": True})  # include_usage injected, then stripped
    anthropic = {"x-api-key": env.key, "anthropic-version": "2023-06-01"}
    assert await drained(await env.post("/anthropic/v1/messages", MESSAGE, anthropic)) == 200
    assert await drained(await env.post("/v1/chat/completions", CHAT, key="lc_nope")) == 401
    resp = await env.post("/v1/chat/completions", b"{not json", raw=True)
    assert await drained(resp) == 400
    p.next(Script(status=500, body=b'{"error":{"message":"boom"}}'))
    assert await drained(await env.post("/v1/chat/completions", CHAT)) == 500
    p.next(Script(events=[sse({"n": i}) for i in range(5)], interval=0.01, drop_after=2))
    await stream(env, {**CHAT, "stream": True})  # the provider drops the stream
    p.stream_interval, p.stream_words = 0.05, ["w"] * 40
    await stream(env, {**CHAT, "stream": True}, hang_up=True)
    p.stream_interval, p.stream_words = 0.0, ["Hel", "lo"]
    await eventually(lambda: not p.open_requests)
    p.next(Script(hang=True))
    pending = treq.post(
        proxy_url(env.service, "/v1/chat/completions"),
        data=json.dumps(CHAT).encode(),
        headers={"authorization": [f"Bearer {env.key}"], "content-type": ["application/json"]},
        persistent=False,
    )
    await eventually(lambda: p.open_requests)
    pending.cancel()  # the client goes away before the answer's head
    await eventually(lambda: not p.open_requests)
    pending.addErrback(lambda _: None)
    # admitted, then refused, by a new key's own limit (rpm 1)
    issued = await env.c.orgs.create_key(env.org.id, "limited")
    path = f"/admin/orgs/{env.org.id}/keys/{issued.key.id}/limits"
    status, doc = await env.admin("PUT", path, {"rpm": 1})
    assert status == 200, doc
    await env.c.limits.sync()
    key = issued.plaintext.reveal()
    codes = [await drained(await env.post("/v1/chat/completions", CHAT, key=key)) for _ in "12"]
    assert codes == [200, 429]
    steps = env.c.proxy.steps
    env.c.proxy.steps = (*steps[:2], raising_step, *steps[2:])
    try:
        assert await drained(await env.post("/v1/chat/completions", CHAT)) == 500
    finally:
        env.c.proxy.steps = steps


@pytest_twisted.ensureDeferred
async def test_no_outcome_of_a_request_leaves_a_reference_cycle(env):
    await every_outcome(env)  # warm-up: caches, pools, lazily built state
    await eventually(lambda: not env.c.proxy.active)
    gc.collect()
    # Everything alive now is held until the end, so that only what the
    # requests below allocate can be found (an earlier test's stopped service
    # may otherwise be let go of, and collected, meanwhile).
    before = gc.get_objects()
    debug = gc.get_debug()
    gc.set_debug(debug | gc.DEBUG_SAVEALL)
    try:
        for _ in range(2):
            await every_outcome(env)
        await eventually(lambda: not env.c.proxy.active)
        await env.c.recorder.flush_now()
        gc.collect()
        found = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}"
            for o in gc.garbage
            if type(o).__module__.startswith("lectr.")
            and not type(o).__module__.startswith("lectr.admin.")
        )
    finally:
        gc.set_debug(debug)
        gc.garbage.clear()
        del before
    for name in PER_CONNECTION:
        found.pop(name, None)
    assert found == {}, found
