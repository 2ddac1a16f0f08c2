"""Budget alerts: crossing 80 % and 100 % of a budget is announced once per
window in the cluster (two managers on one database), to the metrics, the
log and a real HTTP webhook on loopback that checks the HMAC signature;
failed deliveries are retried with backoff, in the background."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from lectr.limits.alerts import AlertWebhook, sign, verify
from lectr.metrics import Registry
from lectr.util.secret import Secret
from tests.support.limits import LimitsEnv, admitted

SECRET = "whsec-0123456789abcdef"


class Receiver(Resource):
    """A webhook endpoint: records every POST, answers the given statuses
    in turn (the last one from then on)."""

    isLeaf = True

    def __init__(self, statuses=(200,)) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.calls: list[tuple[dict, bytes, int]] = []
        self.port = None

    def render_POST(self, request):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.calls.append((headers, request.content.read(), status))
        request.setResponseCode(status)
        return b"ok"

    async def start(self) -> str:
        site = Site(self)
        site.log = lambda request: None  # (its access log would show the URL's token)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        return f"http://127.0.0.1:{self.port.getHost().port}/hooks/lectr?token=abc"

    def delivered(self) -> list[tuple[dict, bytes, int]]:
        return [c for c in self.calls if c[2] == 200]


def signature_ok(headers: dict, body: bytes) -> bool:
    """What a receiver does, written independently of lectr's code."""
    fields = dict(p.split("=", 1) for p in headers["x-lectr-signature"].split(","))
    mac = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + body, hashlib.sha256)
    fresh = abs(time.time() - int(fields["t"])) < 300
    return fresh and hmac.compare_digest(mac.hexdigest(), fields["v1"])


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await deferLater(reactor, 0.01)


@pytest_twisted.async_yield_fixture
async def env(database, db_url):
    e = LimitsEnv(database, db_url)
    await e.setup()
    yield e
    await e.close()


@pytest_twisted.ensureDeferred
async def test_each_threshold_is_announced_once_in_the_cluster(env):
    receiver = Receiver(statuses=(500, 200))
    url = await receiver.start()
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event) or "")  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        registries = [Registry(), Registry()]
        a, b = [
            await env.manager(
                metrics=r,
                webhook=AlertWebhook(
                    url, Secret(SECRET), reactor=reactor, metrics=r, base_delay=0.05
                ),
            )
            for r in registries
        ]
        await a.update(env.org_id, None, {"usd_per_day": "1.00"})
        await b._reloader.refresh(env.org_id)

        admitted(a.admit(env.org_id, env.key_id, reserve_usd=Decimal("0.9"))).settle(
            tokens=10, cost_usd=Decimal("0.85")
        )
        await a.sync()
        await a.sync()  # (the announcement follows the round that saw it)
        admitted(b.admit(env.org_id, env.key_id, reserve_usd=Decimal("0.01"))).settle(
            tokens=10, cost_usd=Decimal("0.01")
        )
        await b.sync()
        await b.sync()  # b sees 86 %: already announced by a
        admitted(a.admit(env.org_id, env.key_id, reserve_usd=Decimal("0.14"))).settle(
            tokens=10, cost_usd=Decimal("0.14")
        )
        await a.sync()
        await a.sync()
        await until(lambda: len(receiver.delivered()) == 2)
        await deferLater(reactor, 0.2)  # nothing else arrives
        assert len(receiver.delivered()) == 2
        assert sorted(c[2] for c in receiver.calls) == [200, 200, 500]

        events = []
        for headers, body, _ in receiver.delivered():
            assert signature_ok(headers, body)
            assert headers["content-type"] == "application/json"
            assert headers["x-lectr-event"] == "budget.threshold_crossed"
            event = json.loads(body)
            assert event["id"] == headers["x-lectr-event-id"]
            events.append(event)
        # the delivery answered 500 was retried with the same event id
        failed_id = receiver.calls[0][0]["x-lectr-event-id"]
        retried = [c for c in receiver.calls[1:] if c[0]["x-lectr-event-id"] == failed_id]
        assert len(retried) == 1 and retried[0][2] == 200
        first, second = sorted(events, key=lambda e: e["threshold_percent"])
        assert {k: v for k, v in first.items() if k not in ("id", "created_at")} == {
            "type": "budget.threshold_crossed",
            "org_id": env.org_id,
            "key_id": None,
            "scope": "org",
            "budget": "usd_per_day",
            "threshold_percent": 80,
            "limit_usd": "1.00",
            "spent_usd": "0.85",
            "window_start": "2026-03-31T00:00:00+00:00",
            "window_end": "2026-04-01T00:00:00+00:00",
        }
        assert (second["threshold_percent"], second["spent_usd"]) == (100, "1.00")

        alerts_a = registries[0].get("lectr_budget_alerts_total")
        alerts_b = registries[1].get("lectr_budget_alerts_total")
        assert (
            alerts_a.value("usd_per_day", "80") == 1 and alerts_a.value("usd_per_day", "100") == 1
        )
        assert alerts_b.value("usd_per_day", "80") == 0
        deliveries = registries[0].get("lectr_alert_webhook_deliveries_total")
        assert (deliveries.value("delivered"), deliveries.value("retried")) == (2, 1)
        logged = [line for line in lines if line.startswith("budget alert:")]
        assert logged == [
            f"budget alert: org {env.org_id} has spent 85% of its daily budget "
            "($0.85 of $1.00; threshold 80%)",
            f"budget alert: org {env.org_id} has spent 100% of its daily budget "
            "($1.00 of $1.00; threshold 100%)",
        ]
        # the query string of the URL (a token) never reaches the log
        assert not any("token=abc" in line for line in lines)
        # a new day: the thresholds can be crossed again
        await env.advance(30)
        admitted(a.admit(env.org_id, env.key_id, reserve_usd=Decimal("0.9"))).settle(
            tokens=10, cost_usd=Decimal("0.9")
        )
        await a.sync()
        await a.sync()
        await until(lambda: len(receiver.delivered()) == 3)
        assert json.loads(receiver.delivered()[2][1])["window_start"] == "2026-04-01T00:00:00+00:00"
    finally:
        globalLogPublisher.removeObserver(observer)
        await receiver.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_deliveries_give_up_on_refusals_and_after_the_last_retry():
    receiver = Receiver(statuses=(400,))
    url = await receiver.start()
    registry = Registry()
    hook = AlertWebhook(
        url, Secret(SECRET), reactor=reactor, metrics=registry, base_delay=0.02, max_attempts=3
    )
    try:
        started = time.monotonic()
        assert hook.send({"type": "budget.threshold_crossed"}) is None
        assert time.monotonic() - started < 0.05 and hook.pending == 1  # in the background
        await until(lambda: hook.pending == 0)
        assert len(receiver.calls) == 1  # 400: not retried
        receiver.statuses = [503]
        hook.send({"type": "budget.threshold_crossed"})
        await until(lambda: hook.pending == 0)
        assert len(receiver.calls) == 1 + 3
        outcomes = registry.get("lectr_alert_webhook_deliveries_total")
        assert (outcomes.value("failed"), outcomes.value("retried")) == (2, 2)
    finally:
        await receiver.port.stopListening()
    # nobody listening at all: retried, then given up
    hook.send({"type": "budget.threshold_crossed"})
    await until(lambda: hook.pending == 0)
    assert outcomes.value("failed") == 3


def test_the_documented_verification():
    body = b'{"type":"budget.threshold_crossed"}'
    header = sign(SECRET.encode(), 1_700_000_000, body)
    assert verify(SECRET.encode(), header, body, now=1_700_000_100)
    assert not verify(SECRET.encode(), header, body + b" ", now=1_700_000_100)
    assert not verify(b"another-secret-000", header, body, now=1_700_000_100)
    assert not verify(SECRET.encode(), header, body, now=1_700_001_000)  # too old: a replay
    assert not verify(SECRET.encode(), "v1=abc", body, now=1_700_000_000)
