"""Request ids (``x-lectr-request-id`` and the request log's key)."""

from __future__ import annotations

import itertools
import os

# Request ids: a random 64-bit prefix per process and a counter. Unique
# across processes and restarts, valid UUIDs (the request_logs key), and
# much cheaper than uuid4() (a getrandom call and a UUID object per request).
_ID_PREFIX = os.urandom(8).hex()
_ID_PREFIX = f"{_ID_PREFIX[:8]}-{_ID_PREFIX[8:12]}-4{_ID_PREFIX[13:16]}"
_id_counter = itertools.count(int.from_bytes(os.urandom(2), "big") << 40)


def new_request_id() -> str:
    n = next(_id_counter) & 0xFFFFFFFFFFFFFFF
    return f"{_ID_PREFIX}-{0x8000 | (n >> 48):04x}-{n & 0xFFFFFFFFFFFF:012x}"
