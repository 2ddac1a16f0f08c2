"""AI providers: a catalogue of objects that each own everything specific to
one upstream (see :mod:`lectr.providers.base`)."""

from lectr.providers.base import KeyValidation, Provider
from lectr.providers.registry import ProviderRegistry

__all__ = ["KeyValidation", "Provider", "ProviderRegistry"]
