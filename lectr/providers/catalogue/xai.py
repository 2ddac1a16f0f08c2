"""xAI (OpenAI-compatible API)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class XAI(Provider):
    name = "xai"
    display_name = "xAI"
    dialect = OPENAI
    default_base_url = "https://api.x.ai"
    model_prefixes = ("grok-",)


PROVIDERS = [XAI]
