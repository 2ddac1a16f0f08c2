"""``--workers N``: several processes serving one proxy socket.

One process is one reactor, so one core. With ``--workers N`` the process
twistd starts becomes a supervisor: it holds the proxy and admin sockets
(bound first of all by ``lectr.tap``, so a port in use is one clear start-up
error), then spawns N worker processes that adopt those sockets
(``reactor.adoptStreamPort``); the kernel spreads new connections across the
workers.

Each worker is a complete Lectr (``python -m lectr.worker``): its own
database pool, change listener, caches and usage flusher, so every worker
flushes its own usage rows. The supervisor restarts a worker that dies (with
backoff). On SIGTERM it closes its own copies of the sockets (new connections
are then refused as soon as the workers have closed theirs), asks every
worker to stop, waits for them to drain in-flight requests
(``LECTR_SHUTDOWN_GRACE``), and kills stragglers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    ensureDeferred,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from lectr.config import SETTINGS, Config
from lectr.metrics import METRICS_DIR_ENV, MetricsRunDirectory
from lectr.util.listen import ListenError, ListenSpec, bind_ports, describe

__all__ = ["ListenSpec", "WorkerSupervisor"]

#: how long after LECTR_SHUTDOWN_GRACE a worker still stopping is killed: a
#: worker's own stop takes up to the grace, then up to 10 s for the limits to
#: hand their leases back (LimitsManager.stop) and up to 10 s for the final
#: usage rows (UsageRecorder's stop_timeout) before they are spilled to disk;
#: killed earlier, rows still in memory would be lost
KILL_MARGIN = 30.0

READY_FD = 5  # workers write "ready\n" here once their ports are adopted
#: a worker that served this long before it died starts the restart delay
#: afresh; one that dies sooner (a crash loop) doubles it
STABLE_AFTER = 30.0
INHERITED_FIRST_FD = 3  # proxy socket, then admin socket


class WorkerStartupError(Exception):
    pass


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int, *, initial: bool) -> None:
        self.supervisor = supervisor
        self.index = index
        self.initial = initial  # one of the first N, which _start awaits
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()
        self.pid: int | None = None
        self.ready_at: float | None = None
        self._status = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == READY_FD:
            self._status += data
            if b"ready\n" in self._status and not self.ready.called:
                self.ready_at = self.supervisor.now()
                self.ready.callback(None)

    def processEnded(self, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self.ready.called:
            self.ready.errback(
                WorkerStartupError(
                    f"worker {self.index} exited during start-up"
                    f" (status {code if code is not None else 'signal ' + str(sig)})"
                )
            )
            self.ready.addErrback(lambda _: None)
        self.ended.callback(code)
        self.supervisor.worker_ended(self, code, sig)


class WorkerSupervisor(Service):
    """The parent process of ``--workers N``."""

    name = "lectr-supervisor"
    _log = Logger()

    def __init__(
        self,
        config: Config,
        options,
        *,
        reactor,
        executable: str | None = None,
        sockets: dict[str, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self._options = options
        self._reactor = reactor
        self._executable = executable or sys.executable
        # bound by ``twistd lectr`` before anything else (lectr.tap), else in _start
        self._bound = dict(sockets or {})
        self._sockets: list[socket.socket] = []
        self._workers: dict[int, _WorkerProtocol] = {}
        self._stopping = False
        self._stopped: Deferred[None] | None = None  # the one stop (see stopService)
        self._restart_delay: dict[int, float] = {}
        self.ready: Deferred[None] = Deferred()
        self._metrics_dir: MetricsRunDirectory | None = None

    # --- start -------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._reactor.callWhenRunning(self._begin)

    def _begin(self) -> None:
        from lectr.service import StartupError, _exit_after_reactor, fail_ready, tell_operator

        d = ensureDeferred(self._start())

        def failed(failure) -> None:
            if failure.check(FirstError):  # the DeferredList of the workers' starts
                failure = failure.value.subFailure
            if self._stopping:
                # SIGTERM while the workers were starting: they stopped (and
                # "exited during start-up"), as asked; not a start-up failure
                self._log.info("start-up interrupted: Lectr is stopping")
                fail_ready(self.ready, failure)
                return
            message = (
                str(failure.value)
                if failure.check(StartupError, WorkerStartupError)
                else (f"unexpected error: {failure.getErrorMessage()}")
            )
            if not failure.check(StartupError, WorkerStartupError):
                self._log.failure("supervisor start-up failed", failure)
            self._log.critical("start-up failed: {message}", message=message)
            tell_operator(message)
            fail_ready(self.ready, failure)
            self._stop_once().addBoth(lambda _: _exit_after_reactor(self._reactor, 1))

        d.addErrback(failed)

    async def _start(self) -> None:
        from lectr.service import StartupError

        if len(self._bound) < 2:
            try:
                self._bound = bind_ports(self.config, required=True)
            except ListenError as e:
                raise StartupError(str(e)) from None
        self._sockets = [self._bound["proxy"], self._bound["admin"]]
        for name, sock in zip(("proxy", "admin API"), self._sockets, strict=True):
            self._log.info("{name} socket bound to {address}", name=name, address=describe(sock))
        try:
            # one /metrics for every worker (lectr.metrics)
            self._metrics_dir = MetricsRunDirectory.create(self.config.data_dir)
        except OSError as e:
            raise StartupError(
                f"cannot create the metrics directory in {self.config.data_dir}: {e.strerror}"
            ) from None
        results = await DeferredList(
            [self._spawn(i).ready for i in range(self.config.workers)],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        del results
        self._log.info("Lectr is ready ({n} workers)", n=self.config.workers)
        self.ready.callback(None)

    def _spawn(self, index: int, *, initial: bool = True) -> _WorkerProtocol:
        protocol = _WorkerProtocol(self, index, initial=initial)
        env = dict(os.environ)
        env.update(self._worker_environment(index))
        child_fds: dict[int, object] = {0: "w", 1: 1, 2: 2, READY_FD: "r"}
        for offset, sock in enumerate(self._sockets):
            child_fds[INHERITED_FIRST_FD + offset] = sock.fileno()
        transport = self._reactor.spawnProcess(
            protocol,
            self._executable,
            [self._executable, "-m", "lectr.worker"],
            env=env,
            childFDs=child_fds,
        )
        protocol.pid = transport.pid
        self._workers[index] = protocol
        return protocol

    def _worker_environment(self, index: int) -> dict[str, str]:
        """Settings given on the command line travel as environment
        variables (secrets were never on it)."""
        env: dict[str, str] = {}
        for s in SETTINGS:
            if not s.option:
                continue
            raw = self._options.get(s.option) if self._options is not None else None
            if s.flag:
                if raw:
                    env[s.env] = "1"
            elif raw is not None:
                env[s.env] = str(raw)
        env["LECTR_DATA_DIR"] = str(self.config.data_dir)
        env["LECTR_WORKERS"] = "1"
        env["LECTR_WORKER_INDEX"] = str(index)
        env["LECTR_WORKER_FDS"] = ",".join(
            str(INHERITED_FIRST_FD + i) for i in range(len(self._sockets))
        )
        env["LECTR_WORKER_FAMILIES"] = ",".join(str(int(s.family)) for s in self._sockets)
        env["LECTR_WORKER_READY_FD"] = str(READY_FD)
        if self._metrics_dir is not None:
            env[METRICS_DIR_ENV] = str(self._metrics_dir.path)
        parent = getattr(self._options, "parent", None)
        if parent is not None and "json_observer" in str(parent.get("logger") or ""):
            env["LECTR_LOG_FORMAT"] = "json"
        return env

    # --- supervision ---------------------------------------------------------------

    def now(self) -> float:
        return self._reactor.seconds()

    def worker_ended(self, worker: _WorkerProtocol, code: int | None, sig: int | None) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if self._metrics_dir is not None and worker.pid is not None:
            try:
                self._metrics_dir.process_ended(worker.pid)
            except OSError as e:
                # (a read-only or vanished data directory): the worker is
                # restarted all the same; only its last gauges linger
                self._log.warn(
                    "cannot remove the gauge files of worker {index} ({error}):"
                    " /metrics may still count its gauges",
                    index=worker.index,
                    error=e.strerror or type(e).__name__,
                )
        if self._stopping:
            return
        if worker.initial and worker.ready_at is None:
            return  # a start-up failure: _start reports it and stops everything
        if worker.ready_at is not None and self.now() - worker.ready_at >= STABLE_AFTER:
            self._restart_delay.pop(worker.index, None)  # it had been serving: no loop
        delay = self._next_delay(worker.index)
        self._log.warn(
            "worker {index} exited{when} (status {code}, signal {sig}); restarting in {delay:.1f}s",
            index=worker.index,
            # a restarted worker that never became ready: a start-up problem
            # (its own lines above say which), not a crash while serving
            when=" during start-up" if worker.ready_at is None else "",
            code=code,
            sig=sig,
            delay=delay,
        )
        self._reactor.callLater(delay, self._restart, worker.index)

    def _next_delay(self, index: int) -> float:
        """How long to wait before starting worker ``index`` again: 0.5 s,
        doubled at each restart that follows (up to 30 s) until the worker
        has served for STABLE_AFTER seconds."""
        delay = self._restart_delay.get(index, 0.5)
        self._restart_delay[index] = min(delay * 2, 30.0)
        return delay

    def _restart(self, index: int) -> None:
        if self._stopping or index in self._workers:
            return
        try:
            protocol = self._spawn(index, initial=False)
        except CancelledError:
            raise
        except Exception as e:
            # Fork or exec refused (memory, process limit: OSError), or
            # anything else the reactor raises: retried with backoff. Were it
            # to escape this callLater, nothing would ever start this worker
            # again and the supervisor would serve on with one worker fewer.
            # (Logged by class, not message: the spawn is handed the
            # environment, which holds secrets.)
            delay = self._next_delay(index)
            self._log.warn(
                "cannot start worker {index} ({error}); retrying in {delay:.1f}s",
                index=index,
                error=(e.strerror or str(e)) if isinstance(e, OSError) else type(e).__name__,
                delay=delay,
            )
            self._reactor.callLater(delay, self._restart, index)
            return

        def up(_: None) -> None:
            # The delay is not reset here: a worker that starts and then dies
            # at once, again and again, must still back off (worker_ended
            # resets it once a worker has served for STABLE_AFTER seconds).
            self._log.info("worker {index} is back", index=index)

        # a worker that exits before it is ready is logged by worker_ended
        # ("exited during start-up"), which restarts it
        protocol.ready.addCallbacks(up, lambda f: None)

    # --- stop --------------------------------------------------------------------------

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self._stop_once()

    def _stop_once(self) -> Deferred[None]:
        """The stop, begun once: a second request (twistd's shutdown while a
        failed start-up unwinds) waits for the same workers to end, rather
        than letting the reactor stop under them."""
        if self._stopped is None:
            self._stopped = ensureDeferred(self._stop())
        return self._stopped

    async def _stop(self) -> None:
        self._stopping = True
        # Close our copies of the listening sockets first: each worker closes
        # its own as it begins to drain, and once the last copy is closed the
        # kernel refuses new connections at once. (Kept open, our copies would
        # keep accepting connections into a backlog nobody reads, and those
        # clients would hang for the whole shutdown grace.)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        workers = list(self._workers.values())
        for w in workers:
            _signal(w, signal.SIGTERM)
        deadline = self.config.shutdown_grace + KILL_MARGIN
        killer = self._reactor.callLater(
            deadline, lambda: [_signal(w, signal.SIGKILL) for w in workers]
        )
        await DeferredList([w.ended for w in workers], consumeErrors=True)
        if killer.active():
            killer.cancel()
        if self._metrics_dir is not None:
            self._metrics_dir.remove()


def _signal(worker: _WorkerProtocol, sig: int) -> None:
    transport = worker.transport
    if transport is not None and getattr(transport, "pid", None):
        try:
            transport.signalProcess(sig)
        except (ProcessExitedAlready, OSError):
            pass  # it is gone already, which is the goal
