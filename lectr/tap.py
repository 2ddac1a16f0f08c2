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


def makeService(options: Options):
    from twisted.internet import reactor

    from lectr.devmode import apply_development_defaults
    from lectr.service import LectrService

    try:
        config = load_config(options.cli_values(), os.environ)
        config = apply_development_defaults(config)
    except ConfigError as e:
        # One clear line, no traceback, non-zero exit; nothing has started yet.
        sys.exit(f"lectr: configuration error: {e}")
    if config.workers > 1:
        from lectr.workers import WorkerSupervisor

        return WorkerSupervisor(config, options, reactor=reactor)
    return LectrService(config, reactor=reactor)
