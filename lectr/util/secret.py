"""A box for secret values that never shows its contents by accident."""

from __future__ import annotations

import hmac
from typing import Generic, TypeVar

T = TypeVar("T", str, bytes)


class Secret(Generic[T]):
    """Holds a secret (a key, a token) so that ``repr``, ``str``, f-strings,
    log formatting and tracebacks print ``<redacted>`` instead of the value.

    The value is only reachable through :meth:`reveal`, which makes every use
    of a secret easy to find in review.
    """

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def equals(self, other: T) -> bool:
        """Constant-time comparison with a candidate value."""
        mine = self._value.encode() if isinstance(self._value, str) else self._value
        theirs = other.encode() if isinstance(other, str) else other
        return hmac.compare_digest(mine, theirs)

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "<redacted>"

    def __reduce__(self):  # never pickle a secret into a file or a queue
        raise TypeError("Secret values cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self.equals(other._value)

    def __hash__(self) -> int:
        return id(self)
