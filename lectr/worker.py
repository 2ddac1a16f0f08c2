"""Entry point of one ``--workers N`` worker process (``python -m lectr.worker``).

Started by :mod:`lectr.workers` with the listening sockets already bound by
the supervisor (their descriptors in ``LECTR_WORKER_FDS``); settings arrive
as environment variables. Writes ``ready`` to ``LECTR_WORKER_READY_FD`` once
it serves. Its standard input is a pipe from the supervisor, never written
to: when it reads end-of-file the supervisor is gone (killed with SIGKILL,
say), and the worker shuts down gracefully rather than serving on, orphaned.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path


class _SupervisorWatch:
    """Reads the supervisor's pipe (standard input): end-of-file means the
    supervisor died; ``on_gone`` is called then."""

    def __init__(self, fd: int, on_gone) -> None:
        self._fd = fd
        self._on_gone = on_gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        from twisted.internet import main as twisted_main

        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else twisted_main.CONNECTION_DONE

    def connectionLost(self, reason) -> None:
        self._on_gone()

    def logPrefix(self) -> str:
        return "supervisor-watch"


def watch_supervisor(reactor, fd: int = 0) -> None:
    """Stop (gracefully: in-flight requests drain, the last usage rows are
    written) once the supervisor's pipe on ``fd`` is closed."""
    import stat

    from twisted.logger import Logger

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return  # not started by a supervisor (run by hand)
    except OSError:
        return

    def gone() -> None:
        Logger().warn("the supervisor is gone; shutting down")
        reactor.stop()

    watch = _SupervisorWatch(fd, gone)
    reactor.addReader(watch)
    # not "gone" when the reactor disconnects every reader at shutdown
    reactor.addSystemEventTrigger("before", "shutdown", reactor.removeReader, watch)


def main() -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from lectr.config import ConfigError, load_config
    from lectr.devmode import apply_development_defaults
    from lectr.logging import json_lines_observer
    from lectr.metrics import METRICS_DIR_ENV, MetricsFileSync
    from lectr.service import LectrService, stop_at_most_once

    # SIGHUP is the supervisor's to act on (it stops every worker in order):
    # a terminal's hangup reaches the whole process group, and by default it
    # would kill the workers at once, requests in flight and unwritten usage
    # rows with them.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
        # the counter files are the worker index's: a restart takes them
        # over instead of leaving one more (lectr.metrics._Files)
        sync = MetricsFileSync(
            service.components.metrics,
            Path(metrics_dir),
            reactor=reactor,
            slot=f"worker{index}",
        )
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
    stop_at_most_once(reactor)
    watch_supervisor(reactor)
    reactor.run()


if __name__ == "__main__":
    main()
