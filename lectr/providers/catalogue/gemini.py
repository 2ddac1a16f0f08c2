"""Google Gemini, through its OpenAI-compatible endpoint
(``…/v1beta/openai/chat/completions``: no ``/v1`` in the path)."""

from lectr.providers.base import KeyOptions, Provider
from lectr.providers.dialects import OPENAI


class Gemini(Provider):
    name = "gemini"
    display_name = "Google Gemini"
    dialect = OPENAI
    default_base_url = "https://generativelanguage.googleapis.com/v1beta/openai"
    model_prefixes = ("gemini-",)
    order = 20

    def upstream_path(self, api_path: bytes, model: str | None, options: KeyOptions) -> bytes:
        return api_path[3:] if api_path.startswith(b"/v1/") else api_path


PROVIDERS = [Gemini]
