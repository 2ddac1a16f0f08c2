"""Groq (OpenAI-compatible API)."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class Groq(Provider):
    name = "groq"
    display_name = "Groq"
    dialect = OPENAI
    default_base_url = "https://api.groq.com/openai"
    model_prefixes = ("llama-", "meta-llama/", "qwen", "gemma", "moonshotai/", "openai/gpt-oss")


PROVIDERS = [Groq]
