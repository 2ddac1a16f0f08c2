"""What pricing costs the proxy: ``PricingManager.price()`` (called once at
the end of every request, on the reactor thread) and ``worst_case_usd()``
(a budget reservation), per call.

    .venv/bin/python bench/pricing_bench.py [--calls 200000]

No database: the shipped catalogue only (overrides make no difference to the
hot path: they are merged into the same in-memory table).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lectr.metrics import Registry
from lectr.pricing.manager import PricingManager
from lectr.usage.meters import anthropic_usage, openai_usage
from lectr.usage.model import Usage


def per_call(fn, calls: int) -> float:
    for _ in range(min(calls, 10_000)):  # warm up (and fill the resolution cache)
        fn()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    pricing = PricingManager(None, reactor=None, metrics=Registry())
    chat = openai_usage(
        {
            "prompt_tokens": 1200,
            "completion_tokens": 350,
            "total_tokens": 1550,
            "prompt_tokens_details": {"cached_tokens": 1024},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "gpt-4o-mini-2024-07-18",
    )
    claude = anthropic_usage(
        {
            "input_tokens": 40,
            "output_tokens": 700,
            "cache_read_input_tokens": 180_000,
            "cache_creation_input_tokens": 30_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 30_000},
        },
        "claude-sonnet-4-5-20250929",
    )
    cut = Usage(completion_tokens=42, source="estimated")
    cases = [
        ("OpenAI chat, cached prompt", lambda: pricing.price("openai", "gpt-4o-mini", chat)),
        (
            "Anthropic, cache reads + 1h writes, long context",
            lambda: pricing.price("anthropic", "claude-sonnet-4-5", claude),
        ),
        (
            "cut stream, prompt from the request size",
            lambda: pricing.price("openai", "gpt-4o", cut, request_bytes=6000),
        ),
        ("unpriced model", lambda: pricing.price("openai", "gpt-made-up", chat)),
        ("no usage", lambda: pricing.price("openai", "gpt-4o", Usage())),
        (
            "worst_case_usd (reservation)",
            lambda: pricing.worst_case_usd(
                "anthropic", "claude-sonnet-4-5", prompt_tokens=5000, max_output_tokens=None
            ),
        ),
    ]
    print(f"{'PricingManager call':<52} {'us/call':>8}")
    for name, fn in cases:
        print(f"{name:<52} {per_call(fn, args.calls):8.2f}")
    # resolving a name never seen (once per (provider, model); cached afterwards)
    names = [f"gpt-4o-2024-{i:06d}" for i in range(20_000)]
    started = time.perf_counter()
    for name in names:
        pricing.resolve("openai", name)
    cold = (time.perf_counter() - started) / len(names) * 1e6
    print(f"{'first resolution of a new model name (then cached)':<52} {cold:8.2f}")


if __name__ == "__main__":
    main()
