"""OpenRouter (OpenAI-compatible API). Models are named ``<vendor>/<model>`` (``openai/gpt-4o``)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class OpenRouter(Provider):
    name = "openrouter"
    display_name = "OpenRouter"
    dialect = OPENAI
    default_base_url = "https://openrouter.ai/api"


PROVIDERS = [OpenRouter]
