"""What operators do to a running Lectr: rotate keys, pull the kill switch,
read the request log — all without a restart."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest

from tests.e2e.conftest import eventually

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello"}]


def chat(stack, key: str):
    client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_key_rotation_without_restart(stack):
    org = stack.new_org(providers=("openai",))
    assert chat(stack, org.key).choices
    new_key = stack.cli_json("orgs", "rotate-key", org.id)["key"]
    started = time.monotonic()

    def old_refused() -> bool:
        try:
            chat(stack, org.key)
        except openai.AuthenticationError:
            return True
        return False

    eventually(old_refused, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert chat(stack, new_key).choices[0].message.content == "Hello!"


def test_kill_switch_each_way_within_a_second(stack):
    org = stack.new_org()
    assert chat(stack, org.key).choices
    stack.cli("orgs", "disable", org.id)
    started = time.monotonic()

    def denied() -> bool:
        try:
            chat(stack, org.key)
        except openai.PermissionDeniedError:
            return True
        return False

    eventually(denied, timeout=1.0)
    assert time.monotonic() - started < 1.0
    stack.fake.reset()
    with pytest.raises(openai.PermissionDeniedError):
        chat(stack, org.key)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=stack.proxy, api_key=org.key, max_retries=0).messages.create(
            model="claude-3-5-haiku-latest", max_tokens=8, messages=MESSAGES
        )
    assert stack.upstream_calls() == []  # the provider received nothing

    stack.cli("orgs", "enable", org.id)
    started = time.monotonic()

    def served() -> bool:
        try:
            return bool(chat(stack, org.key).choices)
        except openai.PermissionDeniedError:
            return False

    eventually(served, timeout=1.0)
    assert time.monotonic() - started < 1.0


def test_every_request_is_logged_with_model_status_and_tokens(stack):
    org = stack.new_org()
    client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    client.embeddings.create(model="text-embedding-3-small", input="x")
    claude = anthropic.Anthropic(base_url=stack.proxy, api_key=org.key, max_retries=0)
    claude.messages.create(model="claude-3-5-haiku-latest", max_tokens=16, messages=MESSAGES)
    with claude.messages.stream(model="claude-e2e-stream", max_tokens=16, messages=MESSAGES) as s:
        s.until_done()
    with pytest.raises(openai.NotFoundError):
        stack.fake._control("next", {"status": 404, "body": '{"error":{"message":"nope"}}'})
        client.chat.completions.create(model="gpt-missing", messages=MESSAGES)

    def logged():
        page = stack.cli_json("requests", org.id, "--limit", "50")
        return page["items"] if len(page["items"]) >= 6 else None

    items = eventually(logged, timeout=10)
    by_model = {i["model"]: i for i in items}
    expect = {
        # model: (status, streamed, prompt, completion, total)
        "gpt-4o-mini": (200, False, 12, 5, 17),
        "gpt-4o": (200, True, 12, 5, 17),
        "text-embedding-3-small": (200, False, 8, None, 8),
        "claude-3-5-haiku-latest": (200, False, 10, 5, 15),
        "claude-e2e-stream": (200, True, 10, 5, 15),
        "gpt-missing": (404, False, None, None, None),
    }
    for model, (status, streamed, prompt, completion, total) in expect.items():
        row = by_model[model]
        assert (row["status"], row["streamed"]) == (status, streamed), row
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            prompt,
            completion,
            total,
        ), row
        assert row["usage_source"] == ("provider" if status == 200 else "none"), row
    totals = stack.cli_json("usage", org.id, "--by", "model")
    assert sum(t["total_tokens"] or 0 for t in totals["items"]) == 17 + 17 + 8 + 15 + 15
