"""Request ids (``x-lectr-request-id`` and the request log's key).

Random UUIDs (version 4) that nobody can predict or enumerate - a client
learns nothing about other requests from its own ids, even on a 401 - made
cheaply from a per-process buffer of CSPRNG bytes (one ``getrandom`` call per
256 ids instead of one per id, and no UUID object)."""

from __future__ import annotations

import os

_BATCH = 256
_buffer = b""
_offset = 0


def new_request_id() -> str:
    global _buffer, _offset
    if _offset >= len(_buffer):
        _buffer = os.urandom(16 * _BATCH)
        _offset = 0
    raw = _buffer[_offset : _offset + 16]
    _offset += 16
    h = raw.hex()
    variant = "89ab"[raw[8] & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def _forget_buffer() -> None:  # a forked child must not reuse its parent's bytes
    global _buffer, _offset
    _buffer, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_buffer)
