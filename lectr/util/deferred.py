"""Small Deferred helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_log = Logger()


class CancellationFlag:
    """Tells a delayed operation that its caller has given up."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


def delay_cancellation(
    start: Callable[[CancellationFlag], Awaitable[T]],
) -> Deferred[T]:
    """Run ``start(flag)`` so that cancelling the returned Deferred does not
    interrupt it midway (a database round trip must finish before the
    connection can be reused). On cancellation the flag is set, the work runs
    to its end (and may check the flag to roll back instead of committing),
    and only then does the returned Deferred fail with ``CancelledError``.
    """
    flag = CancellationFlag()
    inner: Deferred[T] = ensureDeferred(start(flag))

    def cancel(outer: Deferred[T]) -> None:
        flag.cancelled = True
        outer.pause()
        outer.errback(Failure(CancelledError()))
        inner.addBoth(_unpause, outer)

    outer: Deferred[T] = Deferred(cancel)

    def forward(result: Any) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
        elif isinstance(result, Failure) and not result.check(CancelledError):
            _log.failure("operation failed after its caller cancelled it", result)

    inner.addBoth(forward)
    return outer


def _unpause(_: Any, outer: Deferred) -> None:
    outer.unpause()


class OperationTimedOut(Exception):
    pass


def timeout_without_cancel(d: Deferred[T], seconds: float, reactor) -> Deferred[T]:
    """A Deferred with ``d``'s result, or failing with OperationTimedOut after
    ``seconds``. Unlike ``addTimeout``, ``d`` is not cancelled: it finishes in
    its own time and its late result (or failure) is dropped quietly."""
    out: Deferred[T] = Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(Failure(OperationTimedOut(f"no answer within {seconds:g}s")))

    timer = reactor.callLater(seconds, expire)

    def forward(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    d.addBoth(forward)
    return out
