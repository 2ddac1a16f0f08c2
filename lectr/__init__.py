"""Lectr: a self-hosted passthrough gateway for AI providers."""

__version__ = "0.1.0"
