"""What metering costs the relay, per chunk and per response, on the
reactor thread: plan_request, SSE meters (pass-through and stripping the
usage chunk) and the JSON meter.

    .venv/bin/python bench/meter_bench.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lectr.providers.body import read_body
from lectr.usage.meters import meter_for, plan_request
from tests.support.fake_provider import (
    anthropic_stream,
    openai_chat_completion,
    openai_chat_stream,
)

JSON = b"application/json"
SSE = b"text/event-stream"
CHAT = "/v1/chat/completions"
WORDS = [" token"] * 300


def per_response(label: str, make_meter, chunks: list[bytes], rounds: int = 300) -> None:
    """The best of five runs of ``rounds`` responses (the machine may be shared)."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            meter = make_meter()
            for chunk in chunks:
                meter.feed(chunk)
            meter.finish()
        runs.append(time.perf_counter() - started)
    elapsed = min(runs)
    per_chunk = elapsed / rounds / len(chunks) * 1e6
    print(
        f"{label:44s} {elapsed / rounds * 1e6:9.1f} us/response "
        f"({len(chunks)} chunks, {per_chunk:.2f} us/chunk)"
    )


def main() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "hi " * 300}],
        }
    ).encode()
    n = 20000
    started = time.perf_counter()
    for _ in range(n):
        plan = plan_request("openai", b"POST", CHAT, read_body([JSON], body))
    print(
        f"{'read_body + plan_request (1.3 KB, injection)':44s} {(time.perf_counter() - started) / n * 1e6:9.1f} us/request"
    )

    asked = plan_request(
        "openai",
        b"POST",
        CHAT,
        read_body(
            [JSON],
            json.dumps(
                {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
            ).encode(),
        ),
    )
    events = openai_chat_stream("gpt-4o-mini", WORDS, True)
    per_response(
        "OpenAI chat stream, pass-through",
        lambda: meter_for(asked, "openai", CHAT, 200, SSE),
        events,
    )
    per_response(
        "OpenAI chat stream, removing the usage chunk",
        lambda: meter_for(plan, "openai", CHAT, 200, SSE),
        events,
    )
    # under load a 20-event stream reaches the proxy in one or two reads
    # (bench/run.py's streams): the whole run at once, usage chunk included
    short = [b"".join(openai_chat_stream("gpt-4o-mini", WORDS[:18], True))]
    per_response(
        "OpenAI 20-event stream in one read, removing",
        lambda: meter_for(plan, "openai", CHAT, 200, SSE),
        short,
        rounds=1000,
    )
    # event boundaries split across reads (a TLS front's 4 KiB buffer, or a
    # provider's own records): the same stream cut at fixed sizes, and each
    # event cut in two
    whole = b"".join(events)
    for size in (4096, 1000, 300):
        pieces = [whole[i : i + size] for i in range(0, len(whole), size)]
        per_response(
            f"OpenAI chat stream in {size} B reads, removing",
            lambda: meter_for(plan, "openai", CHAT, 200, SSE),
            pieces,
        )
    halves = [half for e in events for half in (e[: len(e) // 2], e[len(e) // 2 :])]
    per_response(
        "OpenAI chat stream, each event in two reads",
        lambda: meter_for(plan, "openai", CHAT, 200, SSE),
        halves,
    )
    anthropic = anthropic_stream("claude", WORDS)
    per_response(
        "Anthropic message stream",
        lambda: meter_for(plan, "anthropic", "/v1/messages", 200, SSE),
        anthropic,
    )
    doc = json.dumps(openai_chat_completion("gpt-4o", content="word " * 2000)).encode()
    chunks = [doc[i : i + 4096] for i in range(0, len(doc), 4096)]
    per_response(
        "OpenAI chat JSON (10 KB)", lambda: meter_for(plan, "openai", CHAT, 200, JSON), chunks
    )
    # as OpenAI answers: compact, its service tier and fingerprint after the usage
    served = openai_chat_completion("gpt-4o", content="word " * 2000)
    served.update(service_tier="default", system_fingerprint="fp_07871e2ad8")
    doc = json.dumps(served, separators=(",", ":")).encode()
    chunks = [doc[i : i + 4096] for i in range(0, len(doc), 4096)]
    per_response(
        "OpenAI chat JSON (10 KB, service_tier)",
        lambda: meter_for(plan, "openai", CHAT, 200, JSON),
        chunks,
    )
    # as OpenAI streams: every chunk names its service tier
    tiered = [
        e.replace(b'"model":"gpt-4o-mini",', b'"model":"gpt-4o-mini","service_tier":"default",')
        for e in events
    ]
    per_response(
        "OpenAI chat stream (service_tier), removing",
        lambda: meter_for(plan, "openai", CHAT, 200, SSE),
        tiered,
    )


if __name__ == "__main__":
    main()
