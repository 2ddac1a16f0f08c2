"""Logging: twisted.logger with structured fields.

``twistd --logger lectr.logging.json_observer lectr`` writes one JSON object a
line to standard output (for log shippers), in Twisted's format: each line
starts with an ASCII record separator (0x1E, RFC 7464 JSON text sequences). Secrets never reach a log event:
they travel in :class:`lectr.util.secret.Secret`, whose repr is
``<redacted>``, and the code never puts a key, a key hash or a token into a
log field.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """Log observer factory for ``twistd --logger``."""
    return jsonFileLogObserver(sys.stdout)
