"""Listening sockets bound before anything else starts.

Lectr binds its two ports first, before the embedded database starts, the
migrations run or the one-time development admin token is printed, so that
"port in use" is the first and only thing an operator sees when it happens.
The bound sockets are adopted by the Twisted ports once the handlers exist
(``reactor.adoptStreamPort``), exactly as ``--workers`` children adopt the
sockets their supervisor bound. Meanwhile the kernel queues connections in
the listen backlog: a client that connects during start-up waits until Lectr
serves, instead of being refused.

``tcp:``, ``tcp6:`` and ``unix:`` endpoints are bound this way; any other
Twisted endpoint (``ssl:``, ``systemd:``…) is listened on late, when the
handlers exist, as Twisted does it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from twisted.python.lockfile import FilesystemLock


class UnsupportedEndpoint(ValueError):
    """An endpoint type this module cannot bind itself (Twisted can)."""


class ListenError(Exception):
    """One line for the operator: which port, which endpoint, what failed."""


#: unix-socket lock files held for the life of the process (as Twisted's
#: own unix ports hold theirs while they listen)
_LOCKS: list[FilesystemLock] = []


@dataclass(frozen=True)
class ListenSpec:
    family: int
    address: tuple | str
    backlog: int
    mode: int = 0o666  # permissions of a unix socket (Twisted's default)
    lockfile: bool = True  # unix: take <path>.lock, then remove a stale socket file

    @classmethod
    def parse(cls, description: str) -> ListenSpec:
        """``tcp:PORT[:interface=IP][:backlog=N]``, ``tcp6:…`` or
        ``unix:PATH[:backlog=N][:mode=0660]``. Raises UnsupportedEndpoint for
        other endpoint types, ValueError for malformed ones."""
        parts = _split(description)
        kind, args = parts[0].lower(), parts[1:]
        positional = [a for a in args if "=" not in a]
        options = dict(a.split("=", 1) for a in args if "=" in a)
        backlog = int(options.pop("backlog", "128"))
        mode, lockfile = 0o666, True
        if kind in ("tcp", "tcp6"):
            port = int(options.pop("port", positional[0] if positional else "0"))
            if not 0 <= port < 65536:
                raise ValueError(f"port {port} is out of range")
            default = "::" if kind == "tcp6" else "0.0.0.0"
            interface = options.pop("interface", default)
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            address: tuple | str = (interface, port)
        elif kind == "unix":
            address = options.pop("address", positional[0] if positional else "")
            if not address:
                raise ValueError("a unix endpoint needs a path")
            mode = int(options.pop("mode", "666"), 8)
            lockfile = bool(int(options.pop("lockfile", "1")))
            family = socket.AF_UNIX
        else:
            raise UnsupportedEndpoint(f"{kind}: endpoints are not bound ahead of start-up")
        if options:
            raise ValueError(f"unsupported endpoint options: {', '.join(options)}")
        return cls(family, address, backlog, mode, lockfile)

    def bind(self) -> socket.socket:
        if self.family == socket.AF_UNIX and self.lockfile:
            self._lock_unix_path()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address)
            if self.family == socket.AF_UNIX:
                os.chmod(self.address, self.mode)
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _lock_unix_path(self) -> None:
        """What Twisted's unix ports do with ``lockfile=1``: hold
        ``<path>.lock``; a lock left by a dead process means the socket file
        is stale, and it is removed."""
        path = str(self.address)
        lock = FilesystemLock(path + ".lock")
        if not lock.lock():
            raise OSError(errno.EADDRINUSE, "another process holds its lock file")
        _LOCKS.append(lock)
        if not lock.clean:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)
            except OSError:
                pass  # bind() then reports what is wrong


def _split(description: str) -> list[str]:
    """Split an endpoint description on ':' honouring '\\:' escapes."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


#: (key, what the operator calls it, Config attribute)
PORTS = (("proxy", "proxy", "proxy_listen"), ("admin", "admin API", "admin_listen"))


def bind_ports(config, *, required: bool = False) -> dict[str, socket.socket]:
    """Bind the proxy and admin ports of ``config``; ``{"proxy": sock,
    "admin": sock}`` for those that could be bound ahead. With ``required``
    (``--workers``), every port must be of a type bound here. Raises
    ListenError; no socket stays open when it does."""
    bound: dict[str, socket.socket] = {}
    try:
        for key, name, attr in PORTS:
            description = getattr(config, attr)
            try:
                spec = ListenSpec.parse(description)
            except UnsupportedEndpoint as e:
                if required:
                    raise ListenError(
                        f"invalid endpoint {description!r} for the {name}: --workers supports "
                        "tcp:, tcp6: and unix: endpoints"
                    ) from e
                continue
            except ValueError as e:
                raise ListenError(f"invalid endpoint {description!r} for the {name}: {e}") from None
            try:
                bound[key] = spec.bind()
            except OSError as e:
                reason = e.strerror or str(e)
                raise ListenError(f"cannot listen on {description} ({name}): {reason}") from None
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)
