"""``twistd lectr``: command-line options and ``makeService``."""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.python import usage

from lectr import __version__
from lectr.config import SETTINGS, ConfigError, load_config


def _describe(s) -> str:
    default = f"default: {s.default}" if s.default is not None else "default: unset"
    return f"{s.help}. [env {s.env}; {default}]"


def _environment_help() -> str:
    lines = ["Settings read only from the environment (secrets never go on a command line):", ""]
    for s in SETTINGS:
        if s.option:
            continue
        default = f" (default {s.default})" if s.default is not None else ""
        lines.append(f"  {s.env}{default}")
        lines.extend(
            textwrap.wrap(s.help + ".", 72, initial_indent="      ", subsequent_indent="      ")
        )
    return "\n".join(lines)


class Options(usage.Options):
    synopsis = "[options]"
    optFlags = [[s.option, None, _describe(s)] for s in SETTINGS if s.option and s.flag]
    optParameters = [
        [s.option, None, None, _describe(s)] for s in SETTINGS if s.option and not s.flag
    ]

    # getUsage() wraps longdesc into one paragraph; keep our layout instead.
    def getUsage(self, width=None) -> str:
        text = super().getUsage(width)
        return (
            f"{text}\nEvery option can also be set with the environment variable shown; "
            "the command line wins.\n\n"
            f"{_environment_help()}\n\nLectr {__version__}\n"
        )

    def opt_version(self) -> None:
        """Print Lectr's version and exit."""
        print(f"Lectr {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        refuse_a_second_instance(self.parent)

    def cli_values(self) -> dict:
        values: dict = {}
        for s in SETTINGS:
            if not s.option:
                continue
            raw = self.get(s.option)
            if s.flag:
                values[s.attr] = True if raw else None
            else:
                values[s.attr] = raw
        return values


def refuse_a_second_instance(twistd_options) -> None:
    """twistd refuses to start where its pidfile names a live process, with
    a paragraph of its own; Lectr says it in one ``lectr:`` line, and exits
    1, before twistd gets there. (A stale pidfile, whose process is gone, is
    left to twistd, which removes it and starts.)"""
    pidfile = twistd_options.get("pidfile") if twistd_options is not None else None
    if not pidfile:
        return
    path = os.path.abspath(pidfile)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return  # none, or unreadable: twistd reports what it finds
    if pid <= 0 or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, owned by someone else
    sys.exit(
        f"lectr: another server (PID {pid}) is already running from this directory "
        f"(pidfile {path}); stop it first, or start this one elsewhere: another directory, "
        "or twistd --pidfile=FILE lectr with other ports"
    )


def makeService(options: Options):
    """Configuration, then the two ports, then everything else: a port in
    use is found before the embedded database starts or the one-time
    development admin token is printed (the sockets bound here are adopted
    once the handlers exist; see :mod:`lectr.util.listen`)."""
    from twisted.internet import reactor

    from lectr.devmode import apply_development_defaults
    from lectr.service import LectrService, stop_at_most_once, stop_on_hangup
    from lectr.util.listen import ListenError, bind_ports

    try:
        config = load_config(options.cli_values(), os.environ)
    except ConfigError as e:
        # One clear line, no traceback, non-zero exit; nothing has started yet.
        sys.exit(f"lectr: configuration error: {e}")
    try:
        sockets = bind_ports(config, required=config.workers > 1)
    except ListenError as e:
        sys.exit(f"lectr: start-up failed: {e}")
    try:
        config = apply_development_defaults(config)
    except ConfigError as e:
        for sock in sockets.values():
            sock.close()
        sys.exit(f"lectr: configuration error: {e}")
    stop_at_most_once(reactor)
    stop_on_hangup(reactor)
    if config.workers > 1:
        from lectr.workers import WorkerSupervisor

        return WorkerSupervisor(config, options, reactor=reactor, sockets=sockets)
    return LectrService(config, reactor=reactor, sockets=sockets)
