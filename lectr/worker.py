"""Entry point of one ``--workers N`` worker process (``python -m lectr.worker``).

Started by :mod:`lectr.workers` with the listening sockets already bound by
the supervisor (their descriptors in ``LECTR_WORKER_FDS``); settings arrive
as environment variables. Writes ``ready`` to ``LECTR_WORKER_READY_FD`` once
it serves.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path


def main() -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from lectr.config import ConfigError, load_config
    from lectr.devmode import apply_development_defaults
    from lectr.logging import json_lines_observer
    from lectr.metrics import METRICS_DIR_ENV, MetricsFileSync
    from lectr.service import LectrService

    index = os.environ.get("LECTR_WORKER_INDEX", "0")
    if os.environ.get("LECTR_LOG_FORMAT") == "json":
        base = json_lines_observer(sys.stdout)
    else:
        base = textFileLogObserver(sys.stdout)

    def observer(event: dict) -> None:
        system = event.get("log_system") or event.get("log_namespace") or "-"
        base({**event, "log_system": f"worker {index}: {system}"})

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        config = load_config({}, os.environ)
        config = apply_development_defaults(config, io.StringIO())  # the parent printed it
    except ConfigError as e:
        sys.exit(f"lectr: configuration error: {e}")

    fds = [int(x) for x in os.environ["LECTR_WORKER_FDS"].split(",")]
    families = [int(x) for x in os.environ["LECTR_WORKER_FAMILIES"].split(",")]
    adopt = dict(zip(("proxy", "admin"), zip(fds, families, strict=True), strict=False))
    ready_fd = int(os.environ.get("LECTR_WORKER_READY_FD", "-1"))

    service = LectrService(config, reactor=reactor, adopt=adopt)
    metrics_dir = os.environ.get(METRICS_DIR_ENV)
    if metrics_dir:  # the supervisor's: one /metrics for every worker
        sync = MetricsFileSync(service.components.metrics, Path(metrics_dir), reactor=reactor)
        sync.start()
        reactor.addSystemEventTrigger("after", "shutdown", sync.stop)

    def ready(_) -> None:
        if ready_fd >= 0:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    service.ready.addCallback(ready)
    service.ready.addErrback(lambda _: None)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
