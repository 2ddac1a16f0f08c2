"""Prices: the catalogue shipped as data (``prices.toml``), global admins'
overrides, and the exact cost of every request (see docs/usage-accounting.md)."""
