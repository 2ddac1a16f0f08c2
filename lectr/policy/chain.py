"""The chain driver.

A step is a callable ``step(call) -> None | Refusal | Deferred[None |
Refusal]``: None lets the request go on, a :class:`Refusal` ends it with an
answer in the route's dialect (no upstream call is made), a Deferred makes
the driver wait (an asynchronous step). Steps read and fill in the call
(:class:`lectr.proxy.call.Call` documents what each step may rely on).

The driver owns the order and the ending: a step that raises, synchronously
or in its Deferred, ends the call through ``failed`` exactly like a refusal
ends it through ``done`` - so a new step cannot leave a request unanswered.
When every step is synchronous (the usual case: policy reads in-memory
caches), no Deferred is created.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer decided by policy: ``kind`` is one of Lectr's error kinds
    (:data:`lectr.providers.dialects.ERROR_STATUS`), rendered in the route's
    dialect; ``headers`` are added to the response (``retry-after``…)."""

    status: int
    kind: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


Step = Callable[[Any], "None | Refusal | Deferred"]


def run_chain(
    steps: Sequence[Step],
    call: Any,
    done: Callable[[Refusal | None], None],
    failed: Callable[[Failure], None],
    *,
    start: int = 0,
    waiting: Callable[[Deferred | None], None] | None = None,
) -> None:
    """Run ``steps[start:]`` on ``call``; then ``done(None)`` (every step
    agreed), ``done(refusal)`` (a step refused) or ``failed(failure)`` (a
    step raised). ``waiting(d)`` is told about the Deferred of an
    asynchronous step (so the caller can cancel it on a disconnect), and
    ``waiting(None)`` when it has fired."""
    n = len(steps)
    i = start
    while i < n:
        try:
            result = steps[i](call)
        except BaseException:
            failed(Failure())
            return
        i += 1
        if result is None:
            continue
        if isinstance(result, Deferred):
            _wait(result, steps, call, done, failed, i, waiting)
            return
        done(result)
        return
    done(None)


def _wait(d, steps, call, done, failed, resume_at, waiting) -> None:
    if waiting is not None:
        waiting(d)

    def resumed(value: Any) -> None:
        if waiting is not None:
            waiting(None)
        if getattr(call, "closed", False):
            # the call ended while the step ran (a step timeout, the client
            # gone, shutdown): a step that still answered - one that fails
            # open on its cancellation - must not run the rest (nothing may
            # be admitted or reserved for an ended call)
            return
        if value is None:
            run_chain(steps, call, done, failed, start=resume_at, waiting=waiting)
        elif isinstance(value, Refusal):
            done(value)
        else:
            failed(Failure(TypeError(f"a policy step answered {type(value).__name__}")))

    def errored(failure: Failure) -> None:
        if waiting is not None:
            waiting(None)
        failed(failure)

    d.addCallbacks(resumed, errored)
