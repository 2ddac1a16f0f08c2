"""Together AI (OpenAI-compatible API)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class Together(Provider):
    name = "together"
    display_name = "Together AI"
    dialect = OPENAI
    default_base_url = "https://api.together.xyz"


PROVIDERS = [Together]
