"""Budget alerts to a webhook: a signed JSON POST, retried with backoff,
entirely in the background (the proxy never waits for it).

Signature (docs/limits.md, "Budget alerts"): the header

    x-lectr-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

over the exact bytes of the body, with ``LECTR_ALERT_WEBHOOK_SECRET``. The
receiver recomputes it, compares in constant time and refuses a ``t`` too
far from its clock (replays). ``x-lectr-event-id`` is the same on every
retry of one event, so a receiver can drop duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from lectr.metrics import Registry
from lectr.util.secret import Secret

# (url, body, headers, timeout) -> status
HttpPost = Callable[[str, bytes, dict[str, str], float], Awaitable[int]]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``x-lectr-signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """What a receiver does (used by the tests; documented for users)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def describe_url(url: str) -> str:
    """The URL for a log line: scheme, host and path, never the query (it
    may carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}" + (
        parts.path or "/"
    )


def treq_post(reactor) -> HttpPost:
    """POST with treq: no redirects followed, no cookies, a fresh
    connection each time (alerts are rare)."""
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, connectTimeout=10, pool=HTTPConnectionPool(reactor, persistent=False))

    async def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        client = HTTPClient(agent)
        response = await client.request(
            "POST",
            url,
            data=body,
            headers={k: [v] for k, v in headers.items()},
            allow_redirects=False,
            timeout=timeout,
            unbuffered=True,
            reactor=reactor,
        )
        await treq.collect(response, lambda _: None)  # read and discard the answer
        return response.code

    return post


class AlertWebhook:
    """Delivers events one POST at a time per event, each retried on a
    network error, a timeout, 429 or 5xx, with exponential backoff and
    jitter (``base_delay`` doubling up to ``max_delay``), ``max_attempts``
    times. At most ``max_pending`` events are in delivery; more are dropped
    with a log line (the event is in the log and the metrics anyway)."""

    _log = Logger()

    def __init__(
        self,
        url: str,
        secret: Secret[str],
        *,
        reactor,
        post: HttpPost | None = None,
        metrics: Registry | None = None,
        timeout: float = 10.0,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        max_pending: int = 1000,
    ) -> None:
        self._url = url
        self._where = describe_url(url)
        self._secret = secret
        self._reactor = reactor
        self._post = post or treq_post(reactor)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._max_pending = max_pending
        self._pending: set[Deferred] = set()
        registry = metrics or Registry()
        self._m_deliveries = registry.counter(
            "lectr_alert_webhook_deliveries_total",
            "Budget-alert webhook deliveries by outcome (delivered, retried, failed, dropped)",
            ["outcome"],
        )

    def send(self, event: dict) -> None:
        """Queue one event; returns at once, never raises."""
        if len(self._pending) >= self._max_pending:
            self._m_deliveries.inc(1, "dropped")
            self._log.warn(
                "alert webhook: {n} deliveries pending; dropping a {type} event",
                n=len(self._pending),
                type=event.get("type"),
            )
            return
        d = ensureDeferred(self._deliver(str(uuid.uuid4()), event))
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self._log.failure("alert webhook delivery crashed", result)

        d.addBoth(done)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _deliver(self, event_id: str, event: dict) -> None:
        body = json.dumps({"id": event_id, **event}, separators=(",", ":")).encode()
        delay = self._base_delay
        for attempt in range(1, self._max_attempts + 1):
            timestamp = int(self._reactor.seconds())
            headers = {
                "content-type": "application/json",
                "user-agent": "lectr-alerts",
                "x-lectr-event": str(event.get("type", "")),
                "x-lectr-event-id": event_id,
                "x-lectr-signature": sign(self._secret.reveal().encode(), timestamp, body),
            }
            try:
                status = await self._post(self._url, body, headers, self._timeout)
            except CancelledError:
                raise
            except Exception as e:
                outcome = f"{type(e).__name__}"
                retry = True
            else:
                if 200 <= status < 300:
                    self._m_deliveries.inc(1, "delivered")
                    self._log.info(
                        "alert webhook: {type} delivered to {where} (attempt {attempt})",
                        type=event.get("type"),
                        where=self._where,
                        attempt=attempt,
                    )
                    return
                outcome = f"HTTP {status}"
                retry = status == 429 or status >= 500 or status == 408
            if not retry or attempt == self._max_attempts:
                self._m_deliveries.inc(1, "failed")
                self._log.warn(
                    "alert webhook: giving up on a {type} event to {where} after {attempt} "
                    "attempt(s) ({outcome})",
                    type=event.get("type"),
                    where=self._where,
                    attempt=attempt,
                    outcome=outcome,
                )
                return
            self._m_deliveries.inc(1, "retried")
            pause = min(delay, self._max_delay) * random.uniform(0.8, 1.2)
            self._log.info(
                "alert webhook: {where} answered {outcome}; retrying in {delay:.1f}s",
                where=self._where,
                outcome=outcome,
                delay=pause,
            )
            await deferLater(self._reactor, pause)
            delay *= 2

    def stop(self) -> None:
        """Abandon the deliveries still retrying (shutdown)."""
        for d in list(self._pending):
            d.cancel()
