"""Waiting on the real reactor in integration tests: hang guards, never
measures."""

from __future__ import annotations

import inspect
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def eventually(predicate, timeout: float = 30.0, step: float = 0.01) -> None:
    """Wait until ``predicate()`` (or the awaitable it returns) is true;
    fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await sleep(step)
