"""A small app that uses the official OpenAI SDK through Lectr.

It makes one ordinary and one streaming chat completion, and prints the
answers with the request id Lectr gave each request (the id that
`lectr requests` shows, and the id to quote when asking about a request).

    LECTR_URL=http://localhost:8080 LECTR_KEY=lc_… python examples/chat.py

LECTR_URL is the proxy's address (default http://localhost:8080). LECTR_KEY
is a Lectr key, never a provider key: Lectr adds the organization's own
OpenAI key upstream. LECTR_MODEL picks the model (default gpt-4o-mini).
"""

from __future__ import annotations

import os
import sys

import openai
from openai import OpenAI


def main() -> int:
    key = os.environ.get("LECTR_KEY")
    if not key:
        print("set LECTR_KEY to a Lectr key (lc_…): `lectr orgs create NAME` prints one")
        return 2
    base_url = os.environ.get("LECTR_URL", "http://localhost:8080").rstrip("/") + "/v1"
    model = os.environ.get("LECTR_MODEL", "gpt-4o-mini")
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "Say hello in five words."}]

    try:
        # An ordinary request. with_raw_response exposes the response headers,
        # where Lectr puts the request id.
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
        completion = raw.parse()
        print(f"answer:   {completion.choices[0].message.content}")
        print(
            f"tokens:   {completion.usage.prompt_tokens} in, {completion.usage.completion_tokens} out"
        )
        print(f"request:  {raw.headers['x-lectr-request-id']}")

        # A streaming request: the text arrives piece by piece, as the
        # provider sends it.
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, stream=True
        ) as response:
            print("streamed: ", end="", flush=True)
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
            print(f"request:  {response.headers['x-lectr-request-id']}")
    except openai.APIConnectionError:
        print(f"cannot reach Lectr at {base_url}: is `twistd -n lectr` running?")
        return 1
    except openai.APIStatusError as e:
        # Lectr's own refusals use OpenAI's error format, so the SDK raises
        # its usual exceptions: 401 AuthenticationError, 403
        # PermissionDeniedError (org disabled, model not allowed, no key)...
        print(f"{type(e).__name__}: {e.message}")
        print(f"request:  {e.response.headers.get('x-lectr-request-id')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
