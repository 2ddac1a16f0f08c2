"""A fake AI provider on 127.0.0.1 for the tests: OpenAI-shaped routes under
``/openai`` and Anthropic-shaped routes under ``/anthropic`` (so tests also
cover base URLs with a path prefix).

It checks the provider key it receives (``Authorization: Bearer`` for OpenAI,
``x-api-key`` for Anthropic) against the keys it was given, records every
request (method, path, query, headers, body), and can be told how to answer
the next requests: a status and body, SSE events at a pace, hang, drop the
connection mid-stream, redirect.

Run it standalone with ``python -m tests.support.fake_provider --port 9000``.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as default_reactor
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.resource import Resource

OPENAI_KEY = "sk-test-openai-0123456789abcdefABCDEF"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdefABCDEF"


@dataclass
class Seen:
    provider: str
    method: str
    path: str  # provider path, e.g. /v1/chat/completions
    query: str
    headers: dict[str, list[str]]  # lower-case names
    body: bytes
    at: float = field(default_factory=time.monotonic)
    request_id: str | None = None  # the x-request-id / request-id answered (request_ids on)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Script:
    """How to answer one request."""

    status: int = 200
    body: bytes | None = None
    headers: dict[str, str | list[str]] = field(default_factory=dict)  # a list: several fields
    events: list[bytes] | None = None  # raw SSE chunks, sent one by one
    interval: float = 0.0  # seconds between chunks
    hang: bool = False  # never answer
    stall_after: bytes | None = None  # send the headers and these body bytes, then stall
    drop_after: int | None = None  # abort the connection after N chunks
    redirect_to: str | None = None


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


def openai_chat_completion(
    model: str, content: str = "Hello!", prompt=12, completion=5, service_tier: str | None = None
) -> dict:
    doc = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    if service_tier is not None:  # (OpenAI: a top-level member after usage)
        doc["service_tier"] = service_tier
    return doc


def served_tier(doc: dict) -> str | None:
    """The ``service_tier`` OpenAI answers with for a request that asked for
    one: the tier it asked for, ``default`` for ``auto``; None when it did not ask."""
    asked = doc.get("service_tier")
    if not isinstance(asked, str):
        return None
    return "default" if asked == "auto" else asked


def openai_chat_stream(
    model: str,
    words: list[str],
    include_usage: bool,
    prompt=12,
    cached=0,
    cid: str | None = None,
    created: int | None = None,
    service_tier: str | None = None,
) -> list[bytes]:
    """What OpenAI streams; with include_usage every chunk carries
    ``"usage": null`` and a usage-only chunk comes before ``[DONE]``; with a
    ``service_tier``, every chunk names it."""
    cid = cid or "chatcmpl-" + uuid.uuid4().hex[:12]
    created = created or int(time.time())

    def chunk(delta: dict, finish=None) -> dict:
        doc = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if service_tier is not None:
            doc["service_tier"] = service_tier
        if include_usage:
            doc["usage"] = None
        return doc

    events = [sse(chunk({"role": "assistant", "content": ""}))]
    events += [sse(chunk({"content": w})) for w in words]
    events.append(sse(chunk({}, "stop")))
    if include_usage:
        last = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": len(words),
                "total_tokens": prompt + len(words),
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
        if service_tier is not None:
            last["service_tier"] = service_tier
        events.append(sse(last))
    events.append(b"data: [DONE]\n\n")
    return events


def openai_completions_stream(
    model: str,
    words: list[str],
    include_usage: bool,
    prompt: int = 7,
    spaced: bool = False,
    nl: str = "\n",
) -> list[bytes]:
    """What OpenAI's legacy completions API streams (one ``text`` piece per
    chunk, an empty one with the finish reason); with include_usage, as for
    chat, every chunk carries ``"usage": null`` and a usage-only chunk
    (``"choices": []``) comes before ``[DONE]``."""

    def event(doc: dict) -> bytes:
        text = json.dumps(doc) if spaced else json.dumps(doc, separators=(",", ":"))
        return f"data: {text}{nl}{nl}".encode()

    head = {"id": "cmpl-1", "object": "text_completion", "created": 1}
    events = []
    for w in [*words, ""]:
        choice = {"text": w, "index": 0, "logprobs": None, "finish_reason": None if w else "stop"}
        doc = {**head, "choices": [choice], "model": model}
        if include_usage:
            doc["usage"] = None
        events.append(event(doc))
    if include_usage:
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words)}
        usage["total_tokens"] = prompt + len(words)
        events.append(event({**head, "choices": [], "model": model, "usage": usage}))
    events.append(f"data: [DONE]{nl}{nl}".encode())
    return events


def anthropic_message(
    model: str, text: str = "Hello!", input_tokens=10, output_tokens=5, web_searches: int = 0
) -> dict:
    doc = {
        "id": "msg_" + uuid.uuid4().hex[:20],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    if web_searches:  # (as Anthropic reports server tools, with the tier that served it)
        doc["usage"]["server_tool_use"] = {"web_search_requests": web_searches}
        doc["usage"]["service_tier"] = "standard"
    return doc


def web_searches(doc: dict) -> int:
    """One search per web-search server tool a Messages request offers."""
    tools = doc.get("tools")
    if not isinstance(tools, list):
        return 0
    return sum(
        1 for t in tools if isinstance(t, dict) and str(t.get("type", "")).startswith("web_search_")
    )


def anthropic_stream(model: str, words: list[str], input_tokens=10, cache_read=0) -> list[bytes]:
    mid = "msg_" + uuid.uuid4().hex[:20]
    events = [
        sse(
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": cache_read,
                    },
                },
            },
            "message_start",
        ),
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
    ]
    for w in words:
        events.append(
            sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
                "content_block_delta",
            )
        )
    events += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


#: the arguments the fake's tool calls carry
TOOL_INPUT = {"city": "Paris"}


def openai_tool_call(model: str, name: str) -> dict:
    doc = openai_chat_completion(model, prompt=30, completion=9)
    doc["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_01",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(TOOL_INPUT)},
            }
        ],
    }
    doc["choices"][0]["finish_reason"] = "tool_calls"
    return doc


def openai_tool_stream(model: str, name: str, include_usage: bool) -> list[bytes]:
    """A streamed tool call, the arguments in pieces (with include_usage, as
    OpenAI does: ``"usage": null`` on every chunk, a usage-only chunk last)."""
    cid = "chatcmpl-" + uuid.uuid4().hex[:12]

    def chunk(delta: dict, finish=None) -> bytes:
        doc = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            doc["usage"] = None
        return sse(doc)

    arguments = json.dumps(TOOL_INPUT)
    call = {"index": 0, "id": "call_01", "type": "function"}
    events = [
        chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": name, "arguments": ""}}],
            }
        )
    ]
    for piece in (arguments[:5], arguments[5:]):
        events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    events.append(chunk({}, "tool_calls"))
    if include_usage:
        usage = {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}
        events.append(
            sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_tool_stream(model: str, name: str) -> list[bytes]:
    """A streamed tool_use block, its input as input_json_delta pieces."""
    events = anthropic_stream(model, [])
    arguments = json.dumps(TOOL_INPUT)
    block = [
        sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_01", "name": name, "input": {}},
            },
            "content_block_start",
        ),
        *(
            sse(
                {
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                },
                "content_block_delta",
            )
            for piece in (arguments[:5], arguments[5:])
        ),
        sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
    ]
    # after the (empty) text block's stop, before message_delta
    at = next(i for i, e in enumerate(events) if e.startswith(b"event: message_delta"))
    events[at:at] = block
    events[at + len(block)] = sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 7},
        },
        "message_delta",
    )
    return events


def multipart_fields(content_type: str, body: bytes) -> dict[str, list[dict]]:
    """The fields of a multipart/form-data body, by name: ``{"value",
    "filename", "content_type"}`` each (a repeated name, ``image[]``, gives
    several). A plain reading, enough for the SDKs' well-formed bodies."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        return {}
    delimiter = b"\r\n--" + m.group(1).encode()
    fields: dict[str, list[dict]] = {}
    for part in (b"\r\n" + body).split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        info: dict = {"value": value, "filename": None, "content_type": None}
        name = None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, rest = line.partition(":")
            if key.lower() == "content-disposition":
                n = re.search(r'(?:^|;)\s*name="([^"]*)"', rest)
                f = re.search(r'filename="([^"]*)"', rest)
                name = n.group(1) if n else None
                info["filename"] = f.group(1) if f else None
            elif key.lower() == "content-type":
                info["content_type"] = rest.strip()
        if name is not None:
            fields.setdefault(name, []).append(info)
    return fields


def _field(fields: dict[str, list[dict]], name: str) -> str | None:
    values = fields.get(name)
    return values[0]["value"].decode("utf-8", "replace") if values else None


def _json_script(doc: Any, status: int = 200) -> Script:
    return Script(status=status, body=json.dumps(doc).encode())


#: what the fake's audio endpoints answer
SPEECH_BYTES = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x00" + bytes(range(256)) * 4
TRANSCRIPT = "hello from the fake"


class FakeProvider(Resource):
    """The root resource. ``keys`` maps provider → accepted keys."""

    isLeaf = True

    def __init__(self, reactor=default_reactor) -> None:
        super().__init__()
        self.reactor = reactor
        self.keys: dict[str, set[str]] = {"openai": {OPENAI_KEY}, "anthropic": {ANTHROPIC_KEY}}
        self.seen: list[Seen] = []
        self.scripts: deque[Script] = deque()
        self.stream_words = ["Hel", "lo", " from", " the", " fake"]
        self.stream_interval = 0.0
        self.open_requests: set = set()
        self.cancelled = 0  # requests whose client went away before the end
        # Answer every request with a request id header, as the providers do
        # (x-request-id for OpenAI-shaped prefixes, request-id for Anthropic).
        # Off by default; POST /_control/options {"request_ids": true}.
        self.request_ids = False
        self.files: dict[str, dict] = {}  # uploaded files (/v1/files), by id
        self.batches: dict[str, dict] = {}  # created batches (/v1/batches), by id
        self.message_batches: dict[str, dict] = {}  # Anthropic's (/v1/messages/batches)

    # --- control --------------------------------------------------------------

    def next(self, script: Script) -> None:
        """Answer the next request with ``script`` instead of the default."""
        self.scripts.append(script)

    def reset(self) -> None:
        self.seen.clear()
        self.scripts.clear()

    def calls(self, provider: str | None = None) -> list[Seen]:
        return [s for s in self.seen if provider is None or s.provider == provider]

    # --- serving --------------------------------------------------------------

    def render(self, request):
        raw_path = request.path.decode()
        if raw_path.startswith("/_control/"):
            return self._control(request, raw_path.removeprefix("/_control/"))
        provider, _, rest = raw_path.lstrip("/").partition("/")
        if provider not in self.keys:
            request.setResponseCode(404)
            return b'{"error":"unknown provider prefix"}'
        path = "/" + rest
        query = request.uri.decode().partition("?")[2]
        headers = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content else b""
        seen = Seen(provider, request.method.decode(), path, query, headers, body)
        self.seen.append(seen)
        request.setHeader(b"x-fake-provider", provider.encode())
        if self.request_ids:
            seen.request_id = "req_" + uuid.uuid4().hex
            name = b"request-id" if provider.startswith("anthropic") else b"x-request-id"
            request.setHeader(name, seen.request_id.encode())

        if not self._authorized(provider, seen):
            return self._error(
                request,
                provider,
                401,
                "invalid x-api-key"
                if provider.startswith("anthropic")
                else "Incorrect API key provided: sk-tes************CDEF.",
            )

        script = self.scripts.popleft() if self.scripts else None
        if script is None:
            script = self._default(provider, seen)
        return self._play(request, script)

    def _control(self, request, action: str) -> bytes:
        """For tests driving a fake provider in another process:
        GET /_control/calls (?request_id=…), POST /_control/reset, POST /_control/next (a
        JSON Script), POST /_control/keys ({"openai": [...], ...}), POST
        /_control/options ({"request_ids": bool, "stream_words": [...]})."""
        request.setHeader(b"content-type", b"application/json")
        if action == "calls":
            # (?request_id=: only the call answered with that request id)
            wanted = request.args.get(b"request_id", [None])[0]
            return json.dumps(
                [
                    {
                        "provider": c.provider,
                        "method": c.method,
                        "path": c.path,
                        "query": c.query,
                        "headers": c.headers,
                        "body": c.body.decode("utf-8", "replace"),
                        "body_b64": base64.b64encode(c.body).decode(),
                        "request_id": c.request_id,
                    }
                    for c in self.seen
                    if wanted is None or (c.request_id or "").encode() == wanted
                ]
            ).encode()
        if action == "reset":
            self.reset()
            return b"{}"
        doc = json.loads(request.content.read() or b"{}")
        if action == "next":
            events = doc.pop("events", None)
            body = doc.pop("body", None)
            self.next(
                Script(
                    **doc,
                    events=[e.encode() for e in events] if events else None,
                    body=body.encode() if body is not None else None,
                )
            )
            return b"{}"
        if action == "keys":
            self.keys = {k: set(v) for k, v in doc.items()}
            return b"{}"
        if action == "options":
            if "request_ids" in doc:
                self.request_ids = bool(doc["request_ids"])
            if "stream_words" in doc:
                self.stream_words = list(doc["stream_words"])
            return b"{}"
        request.setResponseCode(404)
        return b'{"error":"unknown control"}'

    def _authorized(self, provider: str, seen: Seen) -> bool:
        """Anthropic-shaped prefixes check ``x-api-key``, ``azure`` checks
        ``api-key``, every other prefix ``Authorization: Bearer``."""
        if provider.startswith("anthropic"):
            key = seen.header("x-api-key")
        elif provider == "azure":
            key = seen.header("api-key")
        else:
            auth = seen.header("authorization") or ""
            key = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        return key is not None and key in self.keys[provider]

    def _error(self, request, provider: str, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        if provider.startswith("anthropic"):
            kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "api_error")
            return json.dumps(
                {"type": "error", "error": {"type": kind, "message": message}}
            ).encode()
        return json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        ).encode()

    def _default(self, prefix: str, seen: Seen) -> Script:
        # prefixes starting with "anthropic" answer like Anthropic, every
        # other one like OpenAI; Azure deployment
        # paths and Gemini's version-less paths are read as /v1/...
        provider = "anthropic" if prefix.startswith("anthropic") else "openai"
        path = seen.path
        if path.startswith("/openai/deployments/"):
            path = "/v1/" + path.split("/", 4)[4]
        elif path.startswith("/openai/"):
            path = "/v1/" + path[len("/openai/") :]
        elif not path.startswith("/v1/"):
            path = "/v1" + path
        seen = Seen(seen.provider, seen.method, path, seen.query, seen.headers, seen.body)
        doc: dict = {}
        if seen.body and (seen.header("content-type") or "").startswith("application/json"):
            try:
                doc = seen.json()
            except ValueError:
                doc = {}
        model = doc.get("model", "unknown-model") if isinstance(doc, dict) else "unknown-model"
        stream = isinstance(doc, dict) and doc.get("stream") is True
        fields: dict[str, list[dict]] = {}
        content_type = seen.header("content-type") or ""
        if content_type.startswith("multipart/form-data"):
            fields = multipart_fields(content_type, seen.body)
            model = _field(fields, "model") or model
            stream = _field(fields, "stream") == "true"
        surface = self._surface(
            provider, prefix, seen, doc if isinstance(doc, dict) else {}, fields, model, stream
        )
        if surface is not None:
            return surface
        if seen.path == "/v1/models" and seen.method == "GET":
            data = [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}]
            if provider == "anthropic":
                data = [
                    {
                        "type": "model",
                        "id": "claude-3-5-haiku-latest",
                        "display_name": "Claude",
                        "created_at": "2024-01-01T00:00:00Z",
                    }
                ]
                return Script(
                    body=json.dumps(
                        {"data": data, "has_more": False, "first_id": None, "last_id": None}
                    ).encode()
                )
            return Script(body=json.dumps({"object": "list", "data": data}).encode())
        if provider == "openai" and seen.path == "/v1/chat/completions":
            if stream:
                include = bool((doc.get("stream_options") or {}).get("include_usage"))
                return Script(
                    events=openai_chat_stream(
                        model, self.stream_words, include, service_tier=served_tier(doc)
                    ),
                    interval=self.stream_interval,
                )
            answer = openai_chat_completion(model, service_tier=served_tier(doc))
            return Script(body=json.dumps(answer).encode())
        if provider == "openai" and seen.path == "/v1/completions" and stream:
            include = bool((doc.get("stream_options") or {}).get("include_usage"))
            return Script(
                events=openai_completions_stream(model, self.stream_words, include),
                interval=self.stream_interval,
            )
        if provider == "openai" and seen.path == "/v1/embeddings":
            inputs = doc.get("input", "")
            n = len(inputs) if isinstance(inputs, list) else 1
            return Script(
                body=json.dumps(
                    {
                        "object": "list",
                        "data": [
                            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                            for i in range(n)
                        ],
                        "model": model,
                        "usage": {"prompt_tokens": 8 * n, "total_tokens": 8 * n},
                    }
                ).encode()
            )
        if provider == "openai" and seen.path == "/v1/responses":
            usage = {
                "input_tokens": 9,
                "output_tokens": 4,
                "total_tokens": 13,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            resp = {
                "id": "resp_" + uuid.uuid4().hex[:12],
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": model,
                "output": [
                    {
                        "type": "message",
                        "id": "msg_1",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
                    }
                ],
                "usage": usage,
            }
            if stream:
                return Script(
                    events=[
                        sse(
                            {
                                "type": "response.created",
                                "sequence_number": 0,
                                "response": {**resp, "status": "in_progress", "usage": None},
                            },
                            "response.created",
                        ),
                        sse(
                            {
                                "type": "response.output_text.delta",
                                "sequence_number": 1,
                                "item_id": "msg_1",
                                "output_index": 0,
                                "content_index": 0,
                                "delta": "Hi",
                            },
                            "response.output_text.delta",
                        ),
                        sse(
                            {"type": "response.completed", "sequence_number": 2, "response": resp},
                            "response.completed",
                        ),
                    ],
                    interval=self.stream_interval,
                )
            return Script(body=json.dumps(resp).encode())
        if provider == "anthropic" and seen.path == "/v1/messages":
            if stream:
                return Script(
                    events=anthropic_stream(model, self.stream_words), interval=self.stream_interval
                )
            answer = anthropic_message(model, web_searches=web_searches(doc))
            return Script(body=json.dumps(answer).encode())
        return Script(
            status=200, body=json.dumps({"echo": seen.path, "query": seen.query}).encode()
        )

    def _surface(
        self,
        provider: str,
        prefix: str,
        seen: Seen,
        doc: dict,
        fields: dict[str, list[dict]],
        model: str,
        stream: bool,
    ) -> Script | None:
        """The rest of the SDKs' surface (tools, structured output, files,
        batches, audio, images, moderations, token counting…), shaped close
        enough to the real APIs for the official SDKs to parse; None for
        what the routes above answer."""
        method, path = seen.method, seen.path
        parts = path.strip("/").split("/")  # ["v1", "files", "file-1", "content"]
        if provider == "anthropic":
            return self._anthropic_surface(prefix, seen, doc, fields, model, stream, parts)
        if path == "/v1/chat/completions" and method == "POST":
            tools = doc.get("tools")
            if isinstance(tools, list) and tools:
                name = tools[0].get("function", {}).get("name", "tool")
                return (
                    Script(
                        events=openai_tool_stream(
                            model,
                            name,
                            bool((doc.get("stream_options") or {}).get("include_usage")),
                        ),
                        interval=self.stream_interval,
                    )
                    if stream
                    else _json_script(openai_tool_call(model, name))
                )
            fmt = doc.get("response_format")
            if not stream and isinstance(fmt, dict) and fmt.get("type") != "text":
                content = json.dumps({"answer": "Hello!", "n": 1})
                return _json_script(openai_chat_completion(model, content=content))
            return None
        if path == "/v1/completions" and method == "POST" and not stream:
            return _json_script(
                {
                    "id": "cmpl-" + uuid.uuid4().hex[:12],
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"text": "Hello!", "index": 0, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
                }
            )
        if path == "/v1/moderations" and method == "POST":
            categories = {"harassment": False, "hate": False, "violence": False}
            return _json_script(
                {
                    "id": "modr-" + uuid.uuid4().hex[:12],
                    "model": model,
                    "results": [
                        {
                            "flagged": False,
                            "categories": categories,
                            "category_scores": {k: 0.001 for k in categories},
                            "category_applied_input_types": {k: ["text"] for k in categories},
                        }
                    ],
                }
            )
        if parts[:2] == ["v1", "models"] and len(parts) == 3:
            if method == "GET":
                return _json_script(
                    {"id": parts[2], "object": "model", "created": 0, "owned_by": "fake"}
                )
            if method == "DELETE":
                return _json_script({"id": parts[2], "object": "model", "deleted": True})
            return None
        if parts[:2] == ["v1", "files"]:
            return self._openai_files(seen, fields, parts)
        if parts[:2] == ["v1", "batches"]:
            return self._openai_batches(seen, doc, parts)
        if path == "/v1/audio/transcriptions" and method == "POST":
            usage = {
                "type": "tokens",
                "input_tokens": 14,
                "output_tokens": 4,
                "total_tokens": 18,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
            }
            if stream:
                words = TRANSCRIPT.split(" ")
                events = [
                    sse({"type": "transcript.text.delta", "delta": w + " ", "logprobs": None})
                    for w in words
                ]
                events.append(
                    sse({"type": "transcript.text.done", "text": TRANSCRIPT, "usage": usage})
                )
                return Script(events=events, interval=self.stream_interval)
            return _json_script({"text": TRANSCRIPT, "usage": usage})
        if path == "/v1/audio/translations" and method == "POST":
            return _json_script({"text": TRANSCRIPT})
        if path == "/v1/audio/speech" and method == "POST":
            return Script(body=SPEECH_BYTES, headers={"content-type": "audio/mpeg"})
        if path in ("/v1/images/generations", "/v1/images/edits") and method == "POST":
            return _json_script(
                {
                    "created": int(time.time()),
                    "data": [{"b64_json": base64.b64encode(b"\x89PNG fake").decode()}],
                    "usage": {
                        "input_tokens": 50,
                        "output_tokens": 272,
                        "total_tokens": 322,
                        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
                    },
                }
            )
        if parts[:2] == ["v1", "responses"] and len(parts) == 3:
            if method == "DELETE":
                return _json_script({"id": parts[2], "object": "response", "deleted": True})
            if method == "GET":
                return _json_script(
                    {
                        "id": parts[2],
                        "object": "response",
                        "created_at": 0,
                        "status": "completed",
                        "model": "gpt-4o-mini",
                        "output": [],
                    }
                )
        return None

    def _openai_files(self, seen: Seen, fields: dict, parts: list[str]) -> Script | None:
        method = seen.method
        if len(parts) == 2 and method == "POST":
            upload = (fields.get("file") or [{}])[0]
            content = upload.get("value", b"")
            file = {
                "id": "file-" + uuid.uuid4().hex[:24],
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": upload.get("filename") or "upload",
                "purpose": _field(fields, "purpose") or "user_data",
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            }
            self.files[file["id"]] = {**file, "_content": content}
            return _json_script(file)
        public = [
            {k: v for k, v in f.items() if k != "_content"}
            for f in self.files.values()
            if f.get("object") == "file"
        ]
        if len(parts) == 2 and method == "GET":
            return _json_script(
                {
                    "object": "list",
                    "data": public,
                    "has_more": False,
                    "first_id": public[0]["id"] if public else None,
                    "last_id": public[-1]["id"] if public else None,
                }
            )
        if len(parts) == 3 and method == "DELETE":
            self.files.pop(parts[2], None)
            return _json_script({"id": parts[2], "object": "file", "deleted": True})
        file = self.files.get(parts[2]) if len(parts) >= 3 else None
        if file is None:
            return None
        if len(parts) == 3 and method == "GET":
            return _json_script({k: v for k, v in file.items() if k != "_content"})
        if parts[3:] == ["content"] and method == "GET":
            return Script(
                body=file["_content"], headers={"content-type": "application/octet-stream"}
            )
        return None

    def _openai_batches(self, seen: Seen, doc: dict, parts: list[str]) -> Script | None:
        method = seen.method
        if len(parts) == 2 and method == "POST":
            batch = {
                "id": "batch_" + uuid.uuid4().hex[:24],
                "object": "batch",
                "endpoint": doc.get("endpoint"),
                "errors": None,
                "input_file_id": doc.get("input_file_id"),
                "completion_window": doc.get("completion_window"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": doc.get("metadata"),
            }
            self.batches[batch["id"]] = batch
            return _json_script(batch)
        if len(parts) == 2 and method == "GET":
            data = list(self.batches.values())
            return _json_script({"object": "list", "data": data, "has_more": False})
        batch = self.batches.get(parts[2]) if len(parts) >= 3 else None
        if batch is None:
            return None
        if len(parts) == 3 and method == "GET":
            return _json_script(batch)
        if parts[3:] == ["cancel"] and method == "POST":
            batch["status"] = "cancelling"
            return _json_script(batch)
        return None

    def _anthropic_surface(
        self,
        prefix: str,
        seen: Seen,
        doc: dict,
        fields: dict[str, list[dict]],
        model: str,
        stream: bool,
        parts: list[str],
    ) -> Script | None:
        method, path = seen.method, seen.path
        if path == "/v1/messages" and method == "POST":
            tools = doc.get("tools")
            if web_searches(doc):
                return None  # (a server tool: the provider searches and answers)
            if isinstance(tools, list) and tools and isinstance(tools[0], dict):
                name = tools[0].get("name", "tool")
                if stream:
                    return Script(
                        events=anthropic_tool_stream(model, name), interval=self.stream_interval
                    )
                message = anthropic_message(model)
                message["content"] = [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_01", "name": name, "input": TOOL_INPUT},
                ]
                message["stop_reason"] = "tool_use"
                return _json_script(message)
            return None
        if path == "/v1/messages/count_tokens" and method == "POST":
            return _json_script({"input_tokens": 21})
        if parts[:2] == ["v1", "models"] and len(parts) == 3 and method == "GET":
            return _json_script(
                {
                    "type": "model",
                    "id": parts[2],
                    "display_name": "Claude",
                    "created_at": "2024-01-01T00:00:00Z",
                }
            )
        if parts[:3] == ["v1", "messages", "batches"]:
            return self._anthropic_batches(prefix, seen, doc, parts)
        if parts[:2] == ["v1", "files"]:
            return self._anthropic_files(seen, fields, parts)
        return None

    def _anthropic_batches(
        self, prefix: str, seen: Seen, doc: dict, parts: list[str]
    ) -> Script | None:
        method = seen.method
        if len(parts) == 3 and method == "POST":
            requests = doc.get("requests") or []
            batch = {
                "id": "msgbatch_" + uuid.uuid4().hex[:24],
                "type": "message_batch",
                "processing_status": "in_progress",
                "request_counts": {
                    "processing": len(requests),
                    "succeeded": 0,
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "ended_at": None,
                "created_at": "2025-01-01T00:00:00Z",
                "expires_at": "2025-01-02T00:00:00Z",
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": None,
                "_requests": requests,
            }
            self.message_batches[batch["id"]] = batch
            return _json_script({k: v for k, v in batch.items() if k != "_requests"})
        batch = self.message_batches.get(parts[3]) if len(parts) >= 4 else None
        if batch is None:
            return None
        requests = batch["_requests"]
        if len(parts) == 4 and method == "GET":
            # done by the time anyone asks; its results_url is absolute, on the
            # provider's own origin, as Anthropic's is (https://api.anthropic.com/...)
            host = seen.header("host") or "127.0.0.1"
            ended = {
                **batch,
                "processing_status": "ended",
                "ended_at": "2025-01-01T00:01:00Z",
                "request_counts": {**batch["request_counts"], "processing": 0},
                "results_url": f"http://{host}/{prefix}/v1/messages/batches/{batch['id']}/results",
            }
            ended["request_counts"]["succeeded"] = len(requests)
            return _json_script({k: v for k, v in ended.items() if k != "_requests"})
        if parts[4:] == ["results"] and method == "GET":
            lines = [
                json.dumps(
                    {
                        "custom_id": r.get("custom_id"),
                        "result": {
                            "type": "succeeded",
                            "message": anthropic_message(r.get("params", {}).get("model", "")),
                        },
                    }
                )
                for r in requests
            ]
            return Script(
                body=("\n".join(lines) + "\n").encode(),
                headers={"content-type": "application/binary"},
            )
        return None

    def _anthropic_files(self, seen: Seen, fields: dict, parts: list[str]) -> Script | None:
        method = seen.method
        if len(parts) == 2 and method == "POST":
            upload = (fields.get("file") or [{}])[0]
            content = upload.get("value", b"")
            file = {
                "id": "file_" + uuid.uuid4().hex[:24],
                "type": "file",
                "filename": upload.get("filename") or "upload",
                "mime_type": upload.get("content_type") or "application/octet-stream",
                "size_bytes": len(content),
                "created_at": "2025-01-01T00:00:00Z",
                "downloadable": True,
            }
            self.files[file["id"]] = {**file, "_content": content}
            return _json_script(file)
        public = [
            {k: v for k, v in f.items() if k != "_content"}
            for f in self.files.values()
            if f.get("type") == "file"
        ]
        if len(parts) == 2 and method == "GET":
            return _json_script(
                {
                    "data": public,
                    "has_more": False,
                    "first_id": public[0]["id"] if public else None,
                    "last_id": public[-1]["id"] if public else None,
                }
            )
        file = self.files.get(parts[2]) if len(parts) >= 3 else None
        if file is None:
            return None
        if len(parts) == 3 and method == "GET":
            return _json_script({k: v for k, v in file.items() if k != "_content"})
        if len(parts) == 3 and method == "DELETE":
            self.files.pop(parts[2], None)
            return _json_script({"id": parts[2], "type": "file_deleted"})
        if parts[3:] == ["content"] and method == "GET":
            return Script(body=file["_content"], headers={"content-type": file["mime_type"]})
        return None

    def _play(self, request, script: Script):
        if script.redirect_to is not None:
            request.setResponseCode(script.status if script.status in (301, 302, 307, 308) else 302)
            request.setHeader(b"location", script.redirect_to.encode())
            return b""
        request.setResponseCode(script.status)
        for name, value in script.headers.items():
            values = [value] if isinstance(value, str) else value
            request.responseHeaders.setRawHeaders(name.encode(), [v.encode() for v in values])
        self.open_requests.add(request)
        done = request.notifyFinish()

        def finished(result):
            self.open_requests.discard(request)
            if result is not None:  # a Failure: the client went away
                self.cancelled += 1

        done.addBoth(finished)
        if script.hang:
            return server.NOT_DONE_YET
        if script.stall_after is not None:
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            request.write(script.stall_after)  # headers and a first part go out now
            return server.NOT_DONE_YET
        if script.events is None:
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            return script.body or b""
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        self._drip(request, list(script.events), script, 0, done)
        return server.NOT_DONE_YET

    def _drip(
        self, request, events: list[bytes], script: Script, sent: int, done: Deferred
    ) -> None:
        if done.called:
            return  # the client went away
        if script.drop_after is not None and sent >= script.drop_after:
            request.channel.transport.abortConnection()
            return
        if not events:
            request.finish()
            return
        request.write(events.pop(0))
        if script.interval:
            self.reactor.callLater(
                script.interval, self._drip, request, events, script, sent + 1, done
            )
        else:
            self._drip(request, events, script, sent + 1, done)


class FakeProviderServer:
    """Listening fake provider: ``await FakeProviderServer.start()``."""

    def __init__(self, resource: FakeProvider, port) -> None:
        self.resource = resource
        self.port = port

    @classmethod
    async def start(cls, reactor=default_reactor) -> FakeProviderServer:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        resource = FakeProvider(reactor)
        site = server.Site(resource)
        site.noisy = False
        site.log = lambda request: None
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        return cls(resource, port)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def openai_base_url(self) -> str:
        return self.origin + "/openai"

    @property
    def anthropic_base_url(self) -> str:
        return self.origin + "/anthropic"

    async def stop(self) -> None:
        for request in list(self.resource.open_requests):
            if request.channel and request.channel.transport:
                request.channel.transport.abortConnection()
        await self.port.stopListening()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between SSE events")
    args = parser.parse_args()
    resource = FakeProvider()
    resource.stream_interval = args.interval
    site = server.Site(resource)
    site.log = lambda request: None
    default_reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(f"fake provider on http://127.0.0.1:{args.port} (/openai, /anthropic)", flush=True)
    default_reactor.run()


if __name__ == "__main__":
    main()
