"""The official SDKs through a real Lectr: a base-URL swap is all it takes."""

from __future__ import annotations

import asyncio
import json
import subprocess

import anthropic
import openai
import pytest

from tests.e2e.conftest import eventually
from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def org(stack):
    return stack.new_org()


def openai_client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=key, max_retries=0)


def test_openai_sync_chat_stream_embeddings_models(stack, org):
    client = openai_client(stack, org.key)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello!"
    assert reply.usage.total_tokens == 17

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from the fake"
    )
    # Lectr asked the provider for usage on its own account; the client, which
    # did not, sees exactly the stream it would have seen without Lectr.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    upstream = stack.upstream_calls("/v1/chat/completions")[-1]
    assert json.loads(upstream["body"])["stream_options"] == {"include_usage": True}

    # A client that asks for usage gets it.
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 5

    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens == 16
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    # the provider saw the org's key, never the Lectr key
    for call in stack.upstream_calls():
        assert call["headers"].get("authorization") in (
            [f"Bearer {OPENAI_KEY}"],
            [f"Bearer {ANTHROPIC_KEY}"],
            None,
        )
        assert org.key not in json.dumps(call)


def test_openai_async_client(stack, org):
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return reply.choices[0].message.content, text

    assert asyncio.run(run()) == ("Hello!", "Hello from the fake")


def test_openai_responses_api(stack, org):
    client = openai_client(stack, org.key)
    resp = client.responses.create(model="gpt-4o-mini", input="hi")
    assert resp.output_text == "Hi"
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize("suffix", ["", "/anthropic"])
def test_anthropic_sync_create_stream_helper_models(stack, org, suffix):
    client = anthropic.Anthropic(base_url=stack.proxy + suffix, api_key=org.key, max_retries=0)
    msg = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES)
    assert msg.content[0].text == "Hello!"
    assert msg.usage.input_tokens == 10
    with client.messages.stream(
        model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake"
    assert final.usage.output_tokens == 5
    assert [m.id for m in client.models.list()] == ["claude-3-5-haiku-latest"]
    calls = stack.upstream_calls("/v1/messages")
    assert calls and all(c["headers"]["x-api-key"] == [ANTHROPIC_KEY] for c in calls)
    assert all("authorization" not in c["headers"] for c in calls)


def test_anthropic_async_client(stack, org):
    async def run() -> str:
        client = anthropic.AsyncAnthropic(base_url=stack.proxy, api_key=org.key, max_retries=0)
        async with client.messages.stream(
            model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
        await client.close()
        return text

    assert asyncio.run(run()) == "Hello from the fake"


def test_curl(stack, org):
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            f"Authorization: Bearer {org.key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            f"{stack.proxy}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == "Hello!"
    stream_body = json.dumps(
        {"model": "claude-3-5-haiku-latest", "max_tokens": 16, "stream": True, "messages": MESSAGES}
    )
    out = subprocess.run(
        [
            "curl",
            "-sSN",
            "-H",
            f"x-api-key: {org.key}",
            "-H",
            "anthropic-version: 2023-06-01",
            "-H",
            "Content-Type: application/json",
            "-d",
            stream_body,
            f"{stack.proxy}/v1/messages",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "event: message_stop" in out


def test_errors_are_the_sdks_own_exceptions(stack, org):
    bad = "lc_00000000-0000-4000-8000-000000000000"
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(stack, bad).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert bad not in str(e.value)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=stack.proxy, api_key=bad, max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=8, messages=MESSAGES
        )
    stack.cli("providers", "set", org.id, "openai", "--block", "gpt-4o*")
    try:
        client = openai_client(stack, org.key)

        def blocked() -> bool:
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            except openai.PermissionDeniedError as err:
                return "not allowed" in str(err)
            return False

        eventually(blocked, timeout=2)
        client.chat.completions.create(model="o3-mini", messages=MESSAGES)  # still allowed
    finally:
        stack.cli("providers", "set", org.id, "openai", "--unblock-all")
