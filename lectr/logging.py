"""Logging: twisted.logger with structured fields.

``twistd --logger lectr.logging.json_observer lectr`` writes one JSON object
per line to standard output (newline-delimited JSON, what log shippers
expect; Twisted's own default would start each record with an RFC 7464
0x1E byte). Secrets never reach a log event: they travel in
:class:`lectr.util.secret.Secret`, whose repr is ``<redacted>``, and the
code never puts a key, a key hash or a token into a log field.
"""

from __future__ import annotations

import sys
from typing import TextIO

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_lines_observer(out: TextIO) -> ILogObserver:
    return jsonFileLogObserver(out, recordSeparator="")


def json_observer() -> ILogObserver:
    """Log observer factory for ``twistd --logger``."""
    return json_lines_observer(sys.stdout)
