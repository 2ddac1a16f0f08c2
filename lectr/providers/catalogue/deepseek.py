"""DeepSeek (OpenAI-compatible API)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class DeepSeek(Provider):
    name = "deepseek"
    display_name = "DeepSeek"
    dialect = OPENAI
    default_base_url = "https://api.deepseek.com"
    model_prefixes = ("deepseek-",)


PROVIDERS = [DeepSeek]
