"""AI providers: how Lectr routes to, authenticates with, validates keys
for, and speaks the error dialect of each upstream."""

from lectr.providers.base import KeyValidation, Provider, ProviderRegistry

__all__ = ["KeyValidation", "Provider", "ProviderRegistry"]
