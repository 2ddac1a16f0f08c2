"""OpenAI."""

from lectr.providers.base import Provider
from lectr.providers.dialects import OPENAI
from lectr.usage.stream_usage import CHAT_AND_COMPLETIONS_STREAM_USAGE


class OpenAI(Provider):
    name = "openai"
    display_name = "OpenAI"
    dialect = OPENAI
    default_base_url = "https://api.openai.com"
    order = 0
    # (the legacy completions API takes stream_options too: its streams are
    # metered exactly, not estimated)
    stream_usage_paths = CHAT_AND_COMPLETIONS_STREAM_USAGE
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
