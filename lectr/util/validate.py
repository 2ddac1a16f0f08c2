"""Validation helpers shared by managers."""

from __future__ import annotations

import uuid

from lectr.errors import BadRequest, NotFound


def clean_name(value: object, what: str = "name", max_len: int = 200) -> str:
    """A display name: a string of 1..max_len characters after trimming,
    without control characters."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    name = value.strip()
    if not 1 <= len(name) <= max_len:
        raise BadRequest(f"{what} must be 1 to {max_len} characters long")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise BadRequest(f"{what} must not contain control characters")
    return name


def parse_uuid(value: object, what: str = "resource") -> str:
    """A canonical UUID string, or NotFound: a malformed id names nothing, and
    must never reach SQL as text that fails to cast."""
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        raise NotFound(f"{what} not found") from None
