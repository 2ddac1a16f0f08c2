"""The org's provider key never reaches its clients, whatever the client's
Accept-Encoding, the provider's Content-Encoding or the status; and the
model policy judges the one model the provider reads."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
import pytest_twisted

from tests.support.fake_provider import OPENAI_KEY, Script
from tests.test_routing_proxy import AZURE_KEY, CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # the fixture: a Lectr, an org with keys, the fake provider

QUOTING = json.dumps(
    {"error": {"message": f"key {OPENAI_KEY} is not allowed for model x", "type": "invalid"}}
).encode()


@pytest.mark.parametrize("accept", ["gzip", "deflate", "br", "gzip, deflate, br, zstd", "identity"])
@pytest_twisted.ensureDeferred
async def test_providers_are_asked_for_identity_and_auth_errors_are_masked(env, accept):
    env.provider.keys["openai"] = set()  # the provider refuses the org's key, quoting part of it
    resp = await env.post("/v1/chat/completions", CHAT, headers={"accept-encoding": accept})
    assert resp.code == 401
    body = await resp.content()
    assert b"sk-" not in body and OPENAI_KEY[-4:].encode() not in body
    assert env.provider.calls()[-1].header("accept-encoding") == "identity"


@pytest.mark.parametrize("status", [400, 404, 422, 429, 500])
@pytest_twisted.ensureDeferred
async def test_every_error_status_is_masked(env, status):
    env.provider.next(Script(status=status, body=QUOTING))
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == status
    body = await resp.content()
    assert OPENAI_KEY.encode() not in body and b"***" in body


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("x-gzip", gzip.compress)],
)
@pytest_twisted.ensureDeferred
async def test_a_compressed_error_is_decoded_then_masked(env, encoding, compress):
    """A provider that compresses an error although asked for identity."""
    env.provider.next(
        Script(status=400, body=compress(QUOTING), headers={"content-encoding": encoding})
    )
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 400
    assert resp.headers.getRawHeaders(b"content-encoding") in (None, [b""])
    body = await resp.content()
    assert OPENAI_KEY.encode() not in body and b"is not allowed for model x" in body


@pytest_twisted.ensureDeferred
async def test_an_error_in_an_encoding_lectr_cannot_read_is_withheld(env):
    env.provider.next(
        Script(status=403, body=b"\x8b\x02\x80" + QUOTING, headers={"content-encoding": "br"})
    )
    resp = await env.post("/v1/chat/completions", CHAT)
    assert resp.code == 403
    doc = json.loads(await resp.content())
    assert "withheld" in doc["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_key_without_a_recognisable_shape_is_masked_by_its_exact_value(env):
    """Azure keys are 32 hex characters: no pattern finds them; the exact key does."""
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {"provider": "azure", "key": AZURE_KEY, "base_url": env.fake.origin + "/azure"},
    )
    assert status == 201, doc
    env.provider.reset()
    env.provider.next(
        Script(status=401, body=f'{{"error":{{"message":"bad {AZURE_KEY}"}}}}'.encode())
    )
    resp = await env.post("/azure/v1/chat/completions", {**CHAT, "model": "dep"})
    assert resp.code == 401
    body = await resp.content()
    assert AZURE_KEY.encode() not in body and b"bad ***" in body


# --- the model policy reads the provider's model ------------------------------------------


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/json", b'{"model":"gpt-4o-mini","model":"gpt-4o"}'),
        ("application/json", b'{"model":"gpt-4o-mini","mod\\u0065l":"gpt-4o"}'),
        ("text/plain", b'\x0c{"model":"gpt-4o"}'),
        ("application/json; charset=utf-16", b"\xff\xfe{\x00}\x00"),
        ("application/x-www-form-urlencoded", b"model=gpt-4o-mini&model=gpt-4o"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bodies_lectr_cannot_judge_are_refused_without_an_upstream_call(env, ctype, body):
    status, _ = await env.admin(
        "PUT", f"/admin/orgs/{env.org.id}/providers/openai", {"blocked_models": ["gpt-4o"]}
    )
    assert status == 200
    resp = await env.post("/v1/chat/completions", body, raw=True, ctype=ctype)
    assert resp.code == 400
    await resp.content()
    assert env.provider.calls() == []


@pytest_twisted.ensureDeferred
async def test_json_sent_as_another_type_is_judged_as_json(env):
    status, _ = await env.admin(
        "PUT", f"/admin/orgs/{env.org.id}/providers/openai", {"blocked_models": ["gpt-4o"]}
    )
    assert status == 200
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        body = b" \r\n\t" * 500 + b'{"model":"gpt-4o","messages":[]}'
        resp = await env.post("/v1/chat/completions", body, raw=True, ctype=ctype)
        assert resp.code == 403, ctype
        await resp.content()
    assert env.provider.calls() == []
