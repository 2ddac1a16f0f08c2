"""A hang guard for tests of inputs that once held the reactor for seconds
or forever: well above the fixed code's time, far below the old code's. It
measures nothing (SIGALRM interrupts Python code, and CPython's regular
expression engine, which checks for signals while it matches)."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class TooSlow(Exception):
    pass


@contextmanager
def deadline(seconds: float = 10.0, what: str = "still working"):
    def expired(signum, frame):
        raise TooSlow(f"{what} after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
