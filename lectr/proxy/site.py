"""The proxy port's twisted.web Site."""

from __future__ import annotations

from twisted.web.server import Site


class ProxySite(Site):
    """No per-request access log (usage rows are Lectr's request log, written
    in batches), no tracebacks in responses, no factory start/stop noise."""

    noisy = False
    displayTracebacks = False

    def log(self, request) -> None:
        pass
