"""What a request costs beyond its tokens, through the real SDKs: the service
tier OpenAI says served it (Flex at half the standard rates, Priority at
more) and Anthropic's server-side web searches (10 USD per 1,000), stored
with the row and explained line by line."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.e2e.conftest import eventually

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def org(stack):
    return stack.new_org()


def stored(stack, request_id: str) -> dict:
    """The request's cost explanation, once its row is written."""
    found = {}

    def written() -> bool:
        out = stack.cli("--json", "usage", "--explain", request_id, check=False)
        if out.returncode == 0:
            found.update(json.loads(out.stdout))
        return bool(found)

    eventually(written, timeout=15)
    return found


def openai_call(stack, org, **kwargs) -> tuple[str, object]:
    client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="o4-mini", messages=MESSAGES, **kwargs
    )
    return raw.headers["x-lectr-request-id"], raw.parse()


@pytest.mark.parametrize(
    ("asked", "served", "cost"),
    [
        # o4-mini: 12 prompt and 5 completion tokens (the fake provider's answer)
        (None, None, "0.0000352"),  # 12 × 1.10 + 5 × 4.40 per million
        ("auto", "default", "0.0000352"),
        ("flex", "flex", "0.0000176"),  # half of it
        ("priority", "priority", "0.000064"),  # 12 × 2.00 + 5 × 8.00 per million
    ],
)
def test_an_openai_answer_is_priced_at_the_tier_that_served_it(stack, org, asked, served, cost):
    kwargs = {} if asked is None else {"service_tier": asked}
    request_id, reply = openai_call(stack, org, **kwargs)
    assert reply.service_tier == served  # the client's answer, unchanged
    doc = stored(stack, request_id)
    assert doc["request"]["service_tier"] == served
    assert doc["request"]["cost_usd"] == cost
    assert doc["total_usd"] == cost and doc["matches"] is True


def test_a_stream_is_priced_at_its_tier_too(stack, org):
    """A stream that did not ask for usage: Lectr asks for it, strips the
    report, and still reads the tier from it."""
    client = openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key=org.key, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="o4-mini", messages=MESSAGES, stream=True, service_tier="flex"
    ) as response:
        request_id = response.headers["x-lectr-request-id"]
        chunks = list(response.parse())
    assert all(c.usage is None for c in chunks) and chunks[0].service_tier == "flex"
    doc = stored(stack, request_id)
    assert doc["request"]["service_tier"] == "flex"
    # 12 × 0.55 + 5 × 2.20 per million (five words streamed)
    assert doc["request"]["cost_usd"] == "0.0000176"


def test_anthropic_web_searches_are_counted_and_charged(stack, org):
    client = anthropic.Anthropic(base_url=stack.proxy, api_key=org.key, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=MESSAGES,
        tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
    )
    message = raw.parse()
    assert message.usage.server_tool_use.web_search_requests == 1
    doc = stored(stack, raw.headers["x-lectr-request-id"])
    assert doc["request"]["web_search_requests"] == 1
    assert doc["request"]["service_tier"] == "standard"
    # 10 × 3.00 + 5 × 15.00 per million, and one search at 10 per 1,000
    assert doc["request"]["cost_usd"] == "0.010105"
    kinds = {line["kind"] for line in doc["lines"]}
    assert kinds == {"input", "output", "web_search"}
    assert doc["matches"] is True
