"""OpenTelemetry GenAI semantic conventions, as Lectr uses them in metrics
(:mod:`lectr.gateway_metrics`) and traces (:mod:`lectr.tracing`).

https://opentelemetry.io/docs/specs/semconv/gen-ai/ — names are the
conventions' own; in Prometheus the dots become underscores
(``gen_ai.client.token.usage`` → ``gen_ai_client_token_usage``).
"""

from __future__ import annotations

# gen_ai.operation.name by the provider path of the request (the part after
# the provider prefix, without the query string). Anything else is not a
# GenAI operation (models, files, batches…): no GenAI metrics, and spans
# named after the method.
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


def operation_name(path: str) -> str | None:
    """``chat``, ``text_completion`` or ``embeddings`` for the endpoints that
    are GenAI operations; None for the others."""
    return _OPERATIONS.get(path.rstrip("/"))


# Bucket boundaries the conventions recommend.
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
