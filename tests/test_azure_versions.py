"""Azure API versions before 2024-09-01 refuse ``stream_options`` (400
"Unrecognized request argument supplied: stream_options"): Lectr asks a
stream for its usage only on keys whose version accepts it; on older ones
the stream goes as the client wrote it and its usage is estimated."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from lectr.providers.base import NoOptions
from lectr.providers.body import read_body
from lectr.providers.catalogue.azure import Azure
from tests.test_routing_proxy import AZURE_KEY, CHAT
from tests.test_routing_proxy import env as routing_env

env = routing_env  # a Lectr, an org with keys, the fake provider

STREAM = read_body([b"application/json"], json.dumps({**CHAT, "stream": True}).encode())


@pytest.mark.parametrize(
    ("version", "asked"),
    [
        (None, True),  # the default, 2024-10-21
        ("2024-10-21", True),
        ("2024-09-01-preview", True),
        ("2025-04-01-preview", True),
        ("preview", True),  # (the v1 API's)
        ("2024-08-01-preview", False),
        ("2024-06-01", False),
        ("2024-02-01", False),
        ("2023-05-15", False),
    ],
)
def test_stream_usage_is_asked_for_only_where_the_version_accepts_it(version, asked):
    plan = Azure().plan(
        b"POST",
        "/v1/chat/completions",
        STREAM,
        None,
        NoOptions("https://acme.openai.azure.com", version),
    )
    body = json.loads(plan.body or STREAM.body)
    assert ("stream_options" in body) is asked
    assert plan.strip_usage_chunk is asked


@pytest_twisted.ensureDeferred
async def test_an_old_versions_stream_goes_as_the_client_wrote_it(env):
    status, doc = await env.admin(
        "POST",
        f"/admin/orgs/{env.org.id}/provider-keys",
        {
            "provider": "azure",
            "key": AZURE_KEY,
            "base_url": env.fake.origin + "/azure",
            "api_version": "2024-06-01",
        },
    )
    assert status == 201, doc
    env.provider.reset()
    resp = await env.post("/azure/v1/chat/completions", {**CHAT, "stream": True})
    assert resp.code == 200
    await resp.content()
    [call] = env.provider.calls("azure")
    assert call.query == "api-version=2024-06-01"
    assert "stream_options" not in json.loads(call.body)
