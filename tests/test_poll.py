"""lectr.util.poll.lean_dispatch on a real epoll reactor (its own instance,
never run: each test turns it by hand) over real socket pairs."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher

from lectr.util.poll import lean_dispatch


class Reader(FileDescriptor):
    """A readable end of a socket pair, recording what happens to it."""

    def __init__(self, reactor, sock: socket.socket, on_read=None) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.sock.setblocking(False)
        self.read = b""
        self.lost = None
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self):
        self.read += self.sock.recv(65536)
        if self.on_read is not None:
            return self.on_read(self)
        return None

    def connectionLost(self, reason) -> None:
        self.lost = reason
        self.reactor.removeReader(self)


@pytest.fixture
def reactor():
    r = EPollReactor()
    assert lean_dispatch(r)
    yield r
    for s in list(r.getReaders()) + list(r.getWriters()):
        r.removeReader(s)
        r.removeWriter(s)
    r._poller.close()


def pair():
    a, b = socket.socketpair()
    return a, b


def test_the_lean_dispatch_replaces_the_iteration():
    r = EPollReactor()
    try:
        assert r.doIteration == r.doPoll
        assert lean_dispatch(r)
        assert r.doIteration.__func__ is r.doPoll.__func__
        assert r.doIteration.__func__ is not EPollReactor.doPoll
    finally:
        r._poller.close()


def test_other_reactors_are_left_alone():
    memory = MemoryReactor()
    assert not lean_dispatch(memory)
    assert not hasattr(memory, "doPoll")


def test_ready_descriptors_are_read(reactor):
    ends = [pair() for _ in range(3)]
    readers = [Reader(reactor, b) for _, b in ends]
    for r in readers:
        reactor.addReader(r)
    for i, (a, _) in enumerate(ends):
        a.send(b"hello %d" % i)
    reactor.doIteration(1)
    assert [r.read for r in readers] == [b"hello 0", b"hello 1", b"hello 2"]
    assert all(r.lost is None for r in readers)


def test_a_failing_read_loses_that_connection_only(reactor):
    (a1, b1), (a2, b2) = pair(), pair()

    def boom(_reader):
        raise RuntimeError("a protocol bug")

    bad, good = Reader(reactor, b1, on_read=boom), Reader(reactor, b2)
    reactor.addReader(bad)
    reactor.addReader(good)
    a1.send(b"x")
    a2.send(b"y")
    reactor.doIteration(1)
    assert bad.lost is not None and bad.lost.check(RuntimeError)
    assert good.read == b"y" and good.lost is None


def test_an_error_escaping_the_dispatch_is_logged_and_the_turn_goes_on(reactor):
    (a1, b1), (a2, b2) = pair(), pair()
    first, second = Reader(reactor, b1), Reader(reactor, b2)
    reactor.addReader(first)
    reactor.addReader(second)
    real = reactor._doReadOrWrite
    calls = []

    def dispatch(selectable, fd, event):
        calls.append(selectable)
        if len(calls) == 1:
            raise ValueError("escaped")
        return real(selectable, fd, event)

    reactor._doReadOrWrite = dispatch
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        a1.send(b"x")
        a2.send(b"y")
        reactor.doIteration(1)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len(calls) == 2  # the second descriptor was still served
    assert (first.read + second.read) in (b"x", b"y")
    failures = [e for e in seen if e.get("log_level") == LogLevel.critical and "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(ValueError)


def test_a_descriptor_removed_earlier_in_the_turn_is_skipped(reactor):
    (a1, b1), (a2, b2) = pair(), pair()
    readers = {}

    def remove_the_other(me):
        other = readers["b"] if me is readers["a"] else readers["a"]
        reactor.removeReader(other)
        other.sock.close()  # its descriptor is gone from the reactor and the process

    readers["a"] = Reader(reactor, b1, on_read=remove_the_other)
    readers["b"] = Reader(reactor, b2, on_read=remove_the_other)
    reactor.addReader(readers["a"])
    reactor.addReader(readers["b"])
    a1.send(b"x")
    a2.send(b"y")
    reactor.doIteration(1)
    read = [r for r in readers.values() if r.read]
    assert len(read) == 1 and all(r.lost is None for r in readers.values())
