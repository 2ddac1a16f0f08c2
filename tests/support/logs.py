"""Capturing Twisted log events in a test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from twisted.logger import globalLogPublisher


@contextlib.contextmanager
def captured_events() -> Iterator[list[dict]]:
    """Every event logged while the block runs, in order."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
