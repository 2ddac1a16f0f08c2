"""Large request bodies judged in another process.

The proxy and the admin API share one reactor thread, so whatever one
request costs in one turn, every other request waits for. Judging a body
(:func:`lectr.providers.body.read_body`: one strict JSON reading, the model,
duplicate keys; then what the policy reads deep inside it, the prompt-cache
prefix and the output limits) is CPython's C scanner over the whole body in
one call, and a thread would not help: the scanner holds the GIL for a whole
value. A body of millions of small tokens costs it 35-90 ms per MiB, with
the collections and the freeing of its objects: about 1.5 s of one turn for
a 32 MiB body (``LECTR_MAX_BODY_BYTES``' default).

So a body of at least :data:`JUDGE_MIN` bytes is judged by a judge process
(a Python process running :func:`main`, one per Lectr process, started with it and
restarted when it dies), and only what the policy reads comes back: the
kind, the model, where the ``model`` and ``stream_options`` values are in
the body (so that a route or the usage request splices them without
re-encoding the rest), the few top-level members Lectr acts on
(:data:`~lectr.providers.body.JUDGED_MEMBERS`) and
:class:`~lectr.providers.body.BodyFacts`. The body itself never comes back:
the proxy forwards the bytes it holds. The judge runs the very code the
proxy runs on smaller bodies, so a body is refused, or read, the same way
whatever its size (tested against each other on generated bodies).

Bodies wait at most :data:`QUEUE_MAX` at a time, and an org's at most
:data:`TENANT_QUEUE_MAX`; the judge takes the orgs in turn (round robin:
the next body of each org that has one waiting; an org just served goes
behind one whose body arrives before the next take), so that a body waits
for at most the one in the judge and one of each other org waiting, and one
org sending many huge bodies fills only its share of the queue. When the queue or the org's share is
full, when the judge died under a body, or when a body is not judged
:data:`JUDGE_TIMEOUT` after it arrived, the request gets a 503 in the
provider's format, never a body Lectr could not judge. A judge that works
on one body for JUDGE_TIMEOUT is killed, and restarted at once (only a
process that dies before it is up is retried with a growing delay).
Answers are marshalled: their values are JSON's, and one body must never
end the judge. The judge's environment holds only what it needs (no
``LECTR_*`` variable: the master key may be one), and what it reports of a
failure is an exception's class and where it was raised, never a message
(one could quote the body).
"""

from __future__ import annotations

import fcntl
import gc
import marshal
import os
import signal
import struct
import sys
import traceback
from collections import deque

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from lectr.policy.limits import completions, output_limit
from lectr.providers.body import (
    JUDGED_MEMBERS,
    BodyFacts,
    BodyRefused,
    ReadBody,
    read_body,
)
from lectr.providers.dialects import DIALECTS

#: bodies at least this large are judged by the judge process: below it, a
#: body costs the reactor at most a few milliseconds, less than the trip
JUDGE_MIN = 256 * 1024
#: seconds a body may wait for its judgment, queue included (then 503); and
#: seconds a judge process may work on one body before it is killed (and
#: restarted)
JUDGE_TIMEOUT = 30.0
#: bodies waiting for a judge process at most; beyond, 503
QUEUE_MAX = 64
#: bodies of one org (the tenant) waiting at most; beyond, its next is a 503
#: while the other orgs' are still taken
TENANT_QUEUE_MAX = 16
#: the judge's pipe buffers, asked of the kernel (default 64 KiB): fewer
#: writes and reactor turns to hand over a large body
PIPE_BYTES = 1024 * 1024
# restart delays of a judge process that dies before it is up (reset once one is)
_RESTART_FIRST = 0.1
_RESTART_MAX = 10.0

_HEAD = struct.Struct(">II")  # to the judge: header length, body length
_LENGTH = struct.Struct(">I")  # from the judge: answer length
_F_SETPIPE_SZ = 1031  # Linux


class JudgeUnavailable(Exception):
    """No judge process could read the body (too many bodies wait, the
    process died or took too long, Lectr is stopping). The message is shown
    to the client."""


# --- the judge process ------------------------------------------------------------


def judge(content_types: list[bytes] | None, body: bytes, dialect: str) -> tuple:
    """:func:`~lectr.providers.body.read_body` of ``body``, and what the
    policy reads of it: the answer the judge process sends back, without the
    body (see :func:`read_from`). Raises
    :class:`~lectr.providers.body.BodyRefused` as ``read_body`` does."""
    read = read_body(content_types, body)
    doc = read.doc
    kept = None
    facts = None
    if doc is not None:
        # (each at most JUDGED_MEMBER_MAX long: read_body refuses longer ones)
        kept = {key: value for key, value in doc.items() if key in JUDGED_MEMBERS}
        d = DIALECTS[dialect]
        facts = (
            output_limit(doc),
            completions(doc),
            d.session_key(doc),
            d.cache_prefix(doc, len(read.body)),
        )
    return (
        read.kind,
        kept,
        read.model,
        len(body) - len(read.body),  # a UTF-8 byte-order mark removed
        read.model_span,
        read.options_span,
        facts,
    )


def read_from(answer: tuple, body: bytes) -> ReadBody:
    """The :class:`~lectr.providers.body.ReadBody` of ``body`` from a
    :func:`judge` answer."""
    kind, kept, model, skipped, model_span, options_span, facts = answer
    return ReadBody(
        kind,
        kept,
        model,
        body[skipped:] if skipped else body,
        model_span,
        options_span,
        BodyFacts(*facts) if facts is not None else None,
    )


def _where(exc: BaseException) -> str:
    """An exception's class and where it was raised, never its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = frames[-1] if frames else None
    place = f" at {os.path.basename(at.filename)}:{at.lineno} in {at.name}" if at else ""
    return f"{type(exc).__name__}{place}"


def main() -> None:
    """The judge process: bodies in on stdin, answers out on stdout, until
    stdin closes."""
    gc.disable()  # JSON makes no cycles, and nothing else runs here
    # Judging a token-dense body peaks at ~30 times its size (15 MiB of
    # small objects: 461 MiB, given back after): when memory runs out, the
    # kernel is to end this process, which Lectr restarts, not Lectr
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass  # (not Linux)
    # Lectr ends this process (it closes the pipe, or kills it), not a
    # terminal's ^C or a SIGTERM sent to the whole process group: bodies in
    # flight while Lectr drains are still judged
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answers
    stdout.write(_LENGTH.pack(0))  # ready: an empty answer, once imports are done
    stdout.flush()
    while True:
        head = stdin.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return  # Lectr closed the pipe: stopping
        header_length, body_length = _HEAD.unpack(head)
        header = stdin.read(header_length)
        body = stdin.read(body_length)
        if len(header) < header_length or len(body) < body_length:
            return
        dialect, content_types = marshal.loads(header)
        try:
            answer: tuple = ("ok", judge(content_types, body, dialect))
        except BodyRefused as e:
            answer = ("refused", str(e))
        except MemoryError:
            answer = ("refused", "the body is too large to be judged")
        except Exception as e:
            answer = ("error", _where(e))
        del body
        try:
            data = marshal.dumps(answer)
        except Exception as e:  # (one body must never end the judge)
            data = marshal.dumps(("error", _where(e)))
        stdout.write(_LENGTH.pack(len(data)) + data)
        stdout.flush()


# --- Lectr's side -----------------------------------------------------------------


class _Job:
    __slots__ = ("body", "frame", "d", "tenant", "timer", "judge")

    def __init__(self, body: bytes, frame: bytes, d: Deferred, tenant: str) -> None:
        self.body = body
        self.frame = frame
        self.d = d
        self.tenant = tenant
        self.timer = None
        self.judge: _JudgeProcess | None = None


class _FairQueue:
    """The bodies waiting, by tenant, taken round robin: :meth:`popleft`
    takes the first waiting body of the tenant whose turn it is, and that
    tenant's turn comes again after every other tenant waiting has had one,
    including those whose first body arrives before the next take. (The
    tenants with bodies waiting are the keys of a dict, in turn order; the
    tenant served stays first until the next take, and only then goes to
    the end: a tenant that arrived meanwhile is served before its next
    body, so that a body waits for at most the one in the judge and one of
    each tenant ahead of it.)"""

    __slots__ = ("_by", "_n", "_served")

    def __init__(self) -> None:
        self._by: dict[str, deque[_Job]] = {}
        self._n = 0
        self._served: str | None = None  # the tenant taken last, still first

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        for jobs in self._by.values():
            yield from jobs

    def waiting(self, tenant: str) -> int:
        jobs = self._by.get(tenant)
        return len(jobs) if jobs is not None else 0

    def append(self, job: _Job) -> None:
        jobs = self._by.get(job.tenant)
        if jobs is None:
            jobs = self._by[job.tenant] = deque()
        jobs.append(job)
        self._n += 1

    def popleft(self) -> _Job:
        by = self._by
        served, self._served = self._served, None
        if served is not None:
            jobs = by.pop(served, None)
            if jobs:
                by[served] = jobs  # (its next turn: after the others', newcomers included)
        if not by:
            raise IndexError("no body is waiting")
        tenant = next(iter(by))
        jobs = by[tenant]
        job = jobs.popleft()
        if jobs:
            self._served = tenant
        else:
            del by[tenant]
        self._n -= 1
        return job

    def remove(self, job: _Job) -> None:
        """Raises ValueError when ``job`` is not waiting."""
        jobs = self._by.get(job.tenant)
        if jobs is None:
            raise ValueError("not waiting")
        jobs.remove(job)
        self._n -= 1
        if not jobs:
            del self._by[job.tenant]


@implementer(IPullProducer)
class _Feed:
    """Hands a body to a judge a slice at a time, as its pipe drains: handed
    over whole, the transport would copy all of it into one buffer in one
    reactor turn (15 MiB: ~8 ms)."""

    def __init__(self, transport, frame: bytes, body: bytes) -> None:
        self._transport = transport
        self._view: memoryview | None = memoryview(body)
        self._at = 0
        transport.write(frame)
        transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        view = self._view
        if view is None:
            return
        chunk = view[self._at : self._at + PIPE_BYTES]
        self._at += len(chunk)
        if self._at >= len(view):
            self._view = None
            self._transport.unregisterProducer()
        if chunk:
            self._transport.write(bytes(chunk))

    def stopProducing(self) -> None:
        self._view = None  # (the judge ended)


class _JudgeProcess(ProcessProtocol):
    def __init__(self, pool: BodyJudge) -> None:
        self.pool = pool
        self.job: _Job | None = None
        self.ready = False  # it has said so (an empty answer), and was not killed
        self.killed = False  # by the pool (stuck on a body): restarted at once
        self.stuck = None  # the timer that kills it if its body takes too long
        self.ended = Deferred()
        self._answers = bytearray()
        self._errors = b""

    def connectionMade(self) -> None:
        for fd in (0, 1):
            pipe = getattr(self.transport, "pipes", {}).get(fd)
            if pipe is not None:
                try:
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
                except OSError:
                    pass  # (not Linux, or past /proc/sys/fs/pipe-max-size)

    def outReceived(self, data: bytes) -> None:
        buf = self._answers
        buf += data
        while len(buf) >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(buf)
            if len(buf) < _LENGTH.size + n:
                return
            data = bytes(buf[_LENGTH.size : _LENGTH.size + n])
            del buf[: _LENGTH.size + n]
            if not data:  # the process is up
                self.pool._up(self)
                continue
            self.pool._answered(self, marshal.loads(data))

    def errReceived(self, data: bytes) -> None:
        # (what the interpreter itself says, e.g. an import failing at start)
        self._errors = (self._errors + data)[-4096:]
        *lines, self._errors = self._errors.split(b"\n")
        for line in lines:
            if line.strip():
                self.pool.log.warn(
                    "body judge: {line}", line=line[:1000].decode("utf-8", "replace")
                )

    def processEnded(self, reason) -> None:
        self.ready = False
        self.pool._ended(self, reason)
        self.ended.callback(None)


class BodyJudge:
    """The judge processes of one Lectr process, and the bodies waiting for
    them. :meth:`judge` a body; :meth:`start` and :meth:`stop` with the
    service."""

    log = Logger()

    def __init__(
        self,
        *,
        reactor,
        processes: int = 1,
        timeout: float = JUDGE_TIMEOUT,
        queue_max: int = QUEUE_MAX,
        tenant_queue_max: int = TENANT_QUEUE_MAX,
        executable: str | None = None,
        metrics=None,
    ) -> None:
        self._reactor = reactor
        self._processes = processes
        self._timeout = timeout
        self._queue_max = queue_max
        self._tenant_queue_max = tenant_queue_max
        self._executable = executable or sys.executable
        self._judges: list[_JudgeProcess] = []
        self._queue = _FairQueue()
        self._stopping = False
        self._delay = _RESTART_FIRST
        self._restarts: list = []
        self.m_bodies = None
        if metrics is not None:
            self.m_bodies = metrics.counter(
                "lectr_proxy_bodies_judged_total",
                "Request bodies judged in the judge process, by outcome",
                ["outcome"],
            )
            metrics.callback_gauge(
                "lectr_proxy_bodies_waiting",
                "Request bodies waiting for the judge process",
                lambda: len(self._queue),
            )

    # --- the service --------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self._processes):
            self._spawn()

    def stop(self) -> Deferred:
        """Fail the bodies still waiting, close the judges' input (they exit)
        and wait for them; a judge still alive after 5 s is killed."""
        self._stopping = True
        for call in self._restarts:
            if call.active():
                call.cancel()
        while self._queue:
            self._fail(self._queue.popleft(), "The gateway is shutting down; retry.")
        ended = []
        for j in list(self._judges):
            ended.append(j.ended)
            if j.job is not None:
                self._fail(j.job, "The gateway is shutting down; retry.")
            j.transport.closeStdin()
            kill = self._reactor.callLater(5.0, self._kill, j)
            j.ended.addBoth(lambda _, kill=kill: kill.cancel() if kill.active() else None)
        return gatherResults(ended).addCallback(lambda _: None)

    # --- judging ------------------------------------------------------------------

    def judge(
        self, content_types: list[bytes] | None, body: bytes, dialect: str, tenant: str = ""
    ) -> Deferred:
        """A Deferred of the body's :class:`~lectr.providers.body.ReadBody`;
        it fails with :class:`~lectr.providers.body.BodyRefused` (400),
        :class:`JudgeUnavailable` (503) or, for a fault in the judge, a
        RuntimeError. Cancelling it forgets the body. ``tenant`` (the org)
        is whose turn the body waits for."""
        job: _Job

        def cancel(_: Deferred) -> None:
            self._forget(job)

        d: Deferred = Deferred(cancel)
        if self._stopping:
            d.errback(JudgeUnavailable("The gateway is shutting down; retry."))
            return d
        queue = self._queue
        if len(queue) >= self._queue_max or queue.waiting(tenant) >= self._tenant_queue_max:
            self._count("busy")
            d.errback(
                JudgeUnavailable(
                    "Too many large request bodies are waiting to be read; retry shortly."
                )
            )
            return d
        header = marshal.dumps((dialect, content_types))
        job = _Job(body, _HEAD.pack(len(header), len(body)) + header, d, tenant)
        job.timer = self._reactor.callLater(self._timeout, self._timed_out, job)
        self._queue.append(job)
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        for j in self._judges:
            if not self._queue:
                return
            if j.ready and j.job is None:
                job = self._queue.popleft()
                job.judge = j
                j.job = job
                # (the request's own deadline counts its wait in the queue;
                # this one, the judge's time on the body alone)
                j.stuck = self._reactor.callLater(self._timeout, self._stuck, j)
                _Feed(j.transport, job.frame, job.body)

    def _up(self, j: _JudgeProcess) -> None:
        j.ready = not j.killed
        # (the restart delay doubles only while processes die before they
        # are up: one that was up and then died, killed stuck on a body or
        # ended by one, is restarted at once)
        self._delay = _RESTART_FIRST
        self._dispatch()

    def _answered(self, j: _JudgeProcess, answer: tuple) -> None:
        job, j.job = j.job, None
        _cancel(j.stuck)
        j.stuck = None
        if job is not None:
            body = job.body
            self._settle(job)
        if job is not None and not job.d.called:
            outcome, value = answer
            if outcome == "ok":
                self._count("read")
                job.d.callback(read_from(value, body))
            elif outcome == "refused":
                self._count("refused")
                job.d.errback(BodyRefused(value))
            else:
                self._count("error")
                job.d.errback(RuntimeError(f"the body judge failed: {value}"))
        self._dispatch()

    def _forget(self, job: _Job) -> None:
        """The request ended first: its body is not judged, or its answer is
        dropped (a judge stuck on it is still killed in time: ``_stuck``)."""
        self._settle(job)
        if job.judge is None:
            try:
                self._queue.remove(job)
            except ValueError:
                pass

    def _settle(self, job: _Job) -> None:
        _cancel(job.timer)
        job.timer = None
        job.body = b""  # (not held by a judge that is still reading it)

    def _timed_out(self, job: _Job) -> None:
        """The request waited JUDGE_TIMEOUT: it gets its 503. A judge that is
        on its body carries on (its answer is dropped): it is killed only
        when the body alone took that long (``_stuck``)."""
        job.timer = None
        if job.judge is None:
            self._queue.remove(job)
        self._count("timeout")
        self._fail(job, "A large request body could not be read in time; retry shortly.")

    def _stuck(self, j: _JudgeProcess) -> None:
        j.stuck = None
        self.log.warn(
            "body judge: no answer in {timeout:.0f}s; the process is restarted",
            timeout=self._timeout,
        )
        self._kill(j)

    def _fail(self, job: _Job, message: str) -> None:
        self._settle(job)
        if not job.d.called:
            job.d.errback(JudgeUnavailable(message))

    def _count(self, outcome: str) -> None:
        if self.m_bodies is not None:
            self.m_bodies.inc(1, outcome)

    # --- the processes --------------------------------------------------------------

    def _spawn(self) -> None:
        j = _JudgeProcess(self)
        self._judges.append(j)  # (before: connectionMade dispatches to it)
        try:
            self._reactor.spawnProcess(
                j,
                self._executable,
                [self._executable, "-c", _BOOT, "lectr-body-judge"],  # (a name for ps)
                env=_environment(),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            # (fork or exec refused: memory, the process limit) retried
            self.log.warn(
                "cannot start the body judge ({error}); retrying in {delay:.1f}s",
                error=e.strerror or type(e).__name__,
                delay=self._delay,
            )
            self._judges.remove(j)
            self._restart_later()

    def _ended(self, j: _JudgeProcess, reason) -> None:
        if j in self._judges:
            self._judges.remove(j)
        job, j.job = j.job, None
        _cancel(j.stuck)
        j.stuck = None
        if job is not None:
            self._settle(job)
        if job is not None and not job.d.called:
            self._count("died")
            self._fail(job, "A large request body could not be read; retry shortly.")
        if self._stopping:
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.log.warn(
            "body judge exited (status {code}, signal {sig}); restarting in {delay:.1f}s",
            code=code,
            sig=sig,
            delay=self._delay,
        )
        self._restart_later()

    def _restart_later(self) -> None:
        delay, self._delay = self._delay, min(self._delay * 2, _RESTART_MAX)
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(delay, self._restart))

    def _restart(self) -> None:
        if not self._stopping and len(self._judges) < self._processes:
            self._spawn()

    def _kill(self, j: _JudgeProcess) -> None:
        j.ready = False  # (an answer read before its end must not bring it a body)
        j.killed = True
        try:
            j.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


#: the variables the judge gets (a list of what it needs, not of what it must
#: not get: a secret may sit in any variable); PYTHONPATH is set
_PASSED = frozenset(
    ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONHOME")
)


#: how a judge process starts: deaf to SIGINT and SIGTERM before anything
#: else (a terminal's ^C, or a SIGTERM to the whole process group, reaches
#: it too, and would end it in the middle of its imports with a traceback;
#: Lectr ends it by closing its pipe), then main()
_BOOT = (
    "import signal as s; s.signal(s.SIGINT, s.SIG_IGN); s.signal(s.SIGTERM, s.SIG_IGN); "
    "from lectr.proxy.judge import main; main()"
)


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


def _environment() -> dict[str, str]:
    """The judge's environment: where Python finds Lectr, and the locale;
    no ``LECTR_*`` variable (the master key may be one)."""
    import lectr

    env = {k: v for k, v in os.environ.items() if k in _PASSED}
    root = os.path.dirname(os.path.dirname(os.path.abspath(lectr.__file__)))
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return env


if __name__ == "__main__":
    main()
