"""Outgoing HTTP connection pools that do not flood the info log.

Every new connection an ``HTTPConnectionPool`` opens goes through a fresh
``_HTTP11ClientFactory``, and a Twisted factory is ``noisy`` by default: it
logs "Starting factory …" and "Stopping factory …" at info level for each
connection (two lines per upstream connection, hundreds a minute under
load). The pool takes the factory class from its ``_factory`` attribute, so
a pool subclass with a quiet factory removes the lines at their source
without filtering the log. ``tests/test_providers.py`` checks that no such
line appears, so a Twisted release that renames these internals fails a
test rather than silently bringing the lines back.
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietHTTP11ClientFactory


def quiet_pool(reactor, *, persistent: bool = True) -> HTTPConnectionPool:
    return QuietConnectionPool(reactor, persistent=persistent)
