"""The header fields of one HTTP message, as they arrived."""

from __future__ import annotations

from collections.abc import Iterator


class HeaderList:
    """Header fields in arrival order, names in their original case.

    ``raw`` is the list of ``(name, value)`` pairs (values without leading or
    trailing whitespace). Look-ups take a lower-case name and match names
    case-insensitively; the lower-case index is built once, on the first
    look-up, so a message whose headers are only relayed never pays for it.
    """

    __slots__ = ("raw", "_index")

    def __init__(self, raw: list[tuple[bytes, bytes]] | None = None) -> None:
        self.raw = raw if raw is not None else []
        self._index: dict[bytes, list[bytes]] | None = None

    def _build(self) -> dict[bytes, list[bytes]]:
        index: dict[bytes, list[bytes]] = {}
        for name, value in self.raw:
            key = name.lower()
            values = index.get(key)
            if values is None:
                index[key] = [value]
            else:
                values.append(value)
        self._index = index
        return index

    def get(self, name_lower: bytes) -> list[bytes]:
        """Every value of the field, in order ([] when absent)."""
        index = self._index
        if index is None:
            index = self._build()
        return index.get(name_lower, [])

    def first(self, name_lower: bytes) -> bytes | None:
        """The first value of the field, or None."""
        index = self._index
        if index is None:
            index = self._build()
        values = index.get(name_lower)
        return values[0] if values else None

    def add(self, name: bytes, value: bytes) -> None:
        """Append a field (keeps the index, if built, up to date)."""
        self.raw.append((name, value))
        index = self._index
        if index is not None:
            index.setdefault(name.lower(), []).append(value)

    def __contains__(self, name_lower: object) -> bool:
        index = self._index
        if index is None:
            index = self._build()
        return name_lower in index

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        # names only: values carry credentials (Authorization, x-api-key)
        return f"HeaderList(names={[name for name, _ in self.raw]!r})"
