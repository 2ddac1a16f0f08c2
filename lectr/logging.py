"""Logging: twisted.logger with structured fields.

``twistd --logger lectr.logging.json_observer lectr`` writes one JSON object
per line to standard output (newline-delimited JSON, what log shippers
expect; Twisted's own default would start each record with an RFC 7464
0x1E byte). ``log_level`` is the level's name (``"info"``, ``"warn"``…), not
Twisted's serialised constant, so that shippers can filter on it. Secrets
never reach a log event: they travel in :class:`lectr.util.secret.Secret`,
whose repr is ``<redacted>``, and the code never puts a key, a key hash or a
token into a log field.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON


def _as_json_line(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    plain = {k: v for k, v in event.items() if k != "log_logger"}  # a Logger: not data
    if level is not None and not isinstance(level, str):
        plain["log_level"] = getattr(level, "name", str(level))
    return eventAsJSON(plain) + "\n"


def json_lines_observer(out: TextIO) -> ILogObserver:
    return FileLogObserver(out, _as_json_line)


def json_observer() -> ILogObserver:
    """Log observer factory for ``twistd --logger``."""
    return json_lines_observer(sys.stdout)
