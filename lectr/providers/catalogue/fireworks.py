"""Fireworks AI (OpenAI-compatible API)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class Fireworks(Provider):
    name = "fireworks"
    display_name = "Fireworks AI"
    dialect = OPENAI
    default_base_url = "https://api.fireworks.ai/inference"
    model_prefixes = ("accounts/fireworks/",)


PROVIDERS = [Fireworks]
