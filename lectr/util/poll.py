"""The epoll reactor's dispatch of ready descriptors, without the legacy
log context per event.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to
``log.callWithLogger``: it asks the descriptor for its ``logPrefix()``,
copies the legacy logging context into a new dict with that prefix as
``system``, pushes it, calls ``_doReadOrWrite``, pops it - two dicts and
five Python calls for each read or write event, so that a legacy
``log.msg`` made inside the callback is labelled with the connection. A
proxied stream is one such event per relayed chunk. Lectr logs with
``twisted.logger`` and never reads that context, so :func:`lean_dispatch`
gives a running epoll reactor a ``doPoll`` that calls ``_doReadOrWrite``
directly. ``_doReadOrWrite`` already turns a failing ``doRead``/``doWrite``
into that connection's loss; anything escaping it is logged with its
traceback and the loop goes on with the other descriptors, as Twisted's own
safety net does. (Legacy messages logged during a callback are labelled
``-`` instead of the connection's prefix.)
"""

from __future__ import annotations

import errno
import types

from twisted.logger import Logger

_log = Logger()


def _do_poll(self, timeout):
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue  # removed by an earlier callback of this turn
        try:
            dispatch(selectable, fd, event)
        except Exception:
            _log.failure(
                "unhandled error in the reactor's dispatch to {selectable!r}", selectable=selectable
            )


def lean_dispatch(reactor) -> bool:
    """Give ``reactor`` (when it is Twisted's epoll reactor, as ``twistd``
    installs it on Linux) the lean dispatch; True when it has it."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux: no epoll, another reactor
        return False
    if type(reactor) is not EPollReactor:
        return False
    method = types.MethodType(_do_poll, reactor)
    reactor.doPoll = reactor.doIteration = method
    return True
