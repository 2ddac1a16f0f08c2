"""Service helpers: ordered, awaited start-up and shut-down."""

from __future__ import annotations

import os

from twisted.application.service import IService, Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger


class ServiceStack:
    """Children start one at a time in the order given, each awaited before
    the next (Twisted's MultiService ignores the Deferreds that startService
    returns); they stop in reverse order, each awaited, and a failure to stop
    one is logged without stopping the others from stopping."""

    _log = Logger()

    def __init__(self) -> None:
        self._started: list[IService] = []

    async def start(self, service: IService) -> None:
        await maybeDeferred(service.startService)
        self._started.append(service)

    async def stop_all(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self._log.failure("stopping {service} failed", service=_name(service))

    def __iter__(self):
        return iter(list(self._started))


class CallbackService(Service):
    """A service made of two callables (each may return a Deferred)."""

    def __init__(self, name: str, start=None, stop=None) -> None:
        self.name = name
        self._start = start
        self._stop = stop

    def startService(self):
        Service.startService(self)
        return maybeDeferred(self._start) if self._start else None

    def stopService(self):
        Service.stopService(self)
        return maybeDeferred(self._stop) if self._stop else None


class ListeningPortService(Service):
    """Listens on a Twisted endpoint string when started. ``before_stop``
    (optional) runs after the port has stopped accepting connections, e.g.
    to drain in-flight requests."""

    _log = Logger()

    def __init__(
        self,
        name: str,
        description: str,
        factory,
        *,
        reactor,
        before_stop=None,
        adopt: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self._before_stop = before_stop
        self._adopt = adopt  # (file descriptor, address family) bound by a parent process
        self.port: IListeningPort | None = None

    def startService(self):
        Service.startService(self)
        if self._adopt is not None:
            fd, family = self._adopt
            d = maybeDeferred(self._reactor.adoptStreamPort, fd, family, self.factory)
            d.addCallback(lambda port: (os.close(fd), port)[1])
        else:
            d = serverFromString(self._reactor, self.description).listen(self.factory)

        def listening(port: IListeningPort) -> None:
            self.port = port
            self._log.info("{name} listening on {address}", name=self.name, address=_address(port))

        return d.addCallback(listening)

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
        if self._before_stop is not None:
            await maybeDeferred(self._before_stop)

    def stopService(self):
        from twisted.internet.defer import ensureDeferred

        Service.stopService(self)
        return ensureDeferred(self._stop())


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


def _name(service: IService) -> str:
    return getattr(service, "name", None) or type(service).__name__
