"""Mistral AI (OpenAI-compatible API). Mistral's API reports usage in its last stream chunk and does not need
``stream_options``."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI
from lectr.usage.stream_usage import NO_STREAM_USAGE


class Mistral(Provider):
    name = "mistral"
    display_name = "Mistral AI"
    dialect = OPENAI
    default_base_url = "https://api.mistral.ai"
    model_prefixes = ("mistral-", "codestral-", "pixtral-", "ministral-", "magistral-")
    stream_usage_paths = NO_STREAM_USAGE


PROVIDERS = [Mistral]
