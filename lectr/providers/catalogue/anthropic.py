"""Anthropic."""

from lectr.providers.base import X_API_KEY, Provider
from lectr.providers.dialects import ANTHROPIC

API_VERSION = b"2023-06-01"


class Anthropic(Provider):
    name = "anthropic"
    display_name = "Anthropic"
    dialect = ANTHROPIC
    default_base_url = "https://api.anthropic.com"
    order = 1
    model_prefixes = ("claude-",)
    auth = X_API_KEY
    validation_headers = ((b"anthropic-version", API_VERSION),)


PROVIDERS = [Anthropic]
