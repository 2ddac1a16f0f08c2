"""OpenAI."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI


class OpenAI(Provider):
    name = "openai"
    display_name = "OpenAI"
    dialect = OPENAI
    default_base_url = "https://api.openai.com"
    order = 0
    model_prefixes = (
        "gpt-",
        "chatgpt-",
        "o1",
        "o3",
        "o4",
        "text-embedding-",
        "dall-e-",
        "gpt-image-",
        "whisper-",
        "tts-",
        "omni-moderation-",
        "text-moderation-",
        "codex-",
        "computer-use-",
    )


PROVIDERS = [OpenAI]
