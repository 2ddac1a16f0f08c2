"""Limits and budgets across every node: the proxy's admission step, the
background lease rounds against PostgreSQL, budget alerts, administration.

- :meth:`LimitsManager.admit` is the hot path (``Limiter.admit``): in
  memory, never waiting for the database.
- The lease rounds run in the background: whenever a node's allowance runs
  low (kicked from the hot path, at most one round at a time) and every
  ``sync_interval`` seconds (reporting consumption, renewing concurrency
  slots, giving unused allowance back). A round that fails or takes longer
  than ``offline_after`` seconds puts the node in offline mode (held leases,
  then local-only enforcement, or refusals with ``fail_closed``) until a
  round succeeds again.
- The caps are cached in memory, reloaded per org on ``limits:<org>`` and
  ``org:<org>`` notifications and fully after a listener reset.
- Budget thresholds (80 %, 100 %) crossed are claimed in PostgreSQL so that
  one node announces each: a metric, a log line, and the webhook.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg2
import psycopg2.errors
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lectr.db.database import DatabaseUnavailable
from lectr.errors import NotFound
from lectr.limits.alerts import AlertWebhook
from lectr.limits.limiter import Limiter, PendingAlert
from lectr.limits.model import (
    Limits,
    as_datetime,
    clean_changes,
    day_window,
    minute_window,
    month_window,
    usd_text,
)
from lectr.metrics import Registry
from lectr.storage.limits import AlertClaim, Draw, LimitsRow, LimitStore, SlotRequest
from lectr.util.deferred import OperationTimedOut, timeout_without_cancel
from lectr.util.validate import parse_uuid
from lectr.vault.reloader import OrgCacheReloader

_CONTENTION = (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure)


@dataclass(frozen=True, slots=True)
class LimitsView:
    """A scope's limits as stored, and its consumption in the current
    windows as reported by every node."""

    org_id: str
    key_id: str | None
    limits: Limits
    updated_at: datetime | None
    usage: dict


def _limits(row: LimitsRow) -> Limits:
    return Limits(row.rpm, row.tpm, row.max_concurrent, row.usd_per_day, row.usd_per_month)


#: each of the two steps of a stop (the last report, leaving the cluster)
#: waits at most this long for PostgreSQL
STOP_STEP_TIMEOUT = 5.0


class LimitsManager:
    _log = Logger()

    def __init__(
        self,
        store: LimitStore,
        *,
        reactor,
        listener=None,
        metrics: Registry | None = None,
        fail_closed: bool = False,
        lease_fraction: float = 0.05,
        webhook: AlertWebhook | None = None,
        node_id: str | None = None,
        sync_interval: float = 0.25,
        offline_after: float = 2.0,
        heartbeat_interval: float = 5.0,
        slot_ttl: float = 15.0,
        cleanup_interval: float = 3600.0,
        sweep_interval: float = 10.0,
        max_retry: float = 5.0,
    ) -> None:
        self.node_id = node_id or str(uuid.uuid4())
        self._store = store
        self._reactor = reactor
        self._listener = listener
        self._webhook = webhook
        self._sync_interval = sync_interval
        self._offline_after = offline_after
        self._heartbeat_interval = heartbeat_interval
        self._slot_ttl = slot_ttl
        self._cleanup_interval = cleanup_interval
        self._sweep_interval = sweep_interval
        self._swept_at = -1e18
        self._max_retry = max_retry
        registry = metrics or Registry()
        self.limiter = Limiter(
            clock=reactor,
            lease_fraction=lease_fraction,
            fail_closed=fail_closed,
            slot_heartbeat=slot_ttl / 3,
            metrics=registry,
            kick=self._kick,
        )
        #: the proxy's admission step (see Limiter.admit)
        self.admit = self.limiter.admit
        self._reloader = OrgCacheReloader(
            "limits", load_orgs=self._load_orgs, load_all=self._load_all, reactor=reactor
        )
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._cleaner = LoopingCall(self._cleanup)
        self._cleaner.clock = reactor
        self._running: Deferred | None = None
        self._scheduled = None
        self._again = False
        self._waiters: list[Deferred] = []
        self._stopping = False
        self._beat_at = -1e18
        self._retry_delay = sync_interval
        self._next_try = 0.0
        self._offline_since: float | None = None
        self._unclaimed: list[PendingAlert] = []
        self._m_rounds = registry.counter(
            "lectr_limit_lease_rounds_total", "Lease rounds with PostgreSQL by outcome", ["outcome"]
        )
        self._m_round_seconds = registry.histogram(
            "lectr_limit_lease_round_seconds", "Duration of the lease rounds"
        )
        self._m_alerts = registry.counter(
            "lectr_budget_alerts_total",
            "Budget thresholds crossed (announced once per window in the cluster)",
            ["budget", "threshold"],
        )
        registry.callback_gauge(
            "lectr_limits_offline",
            "1 while this node enforces limits without PostgreSQL (held leases, then local-only)",
            lambda: 1 if self.limiter.offline else 0,
            mode="livemax",  # (1 when any worker is: not the number of workers)
        )

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._listener is not None:
            self._listener.subscribe("limits", self._reloader.org_changed)
            self._listener.subscribe("org", self._reloader.org_changed)
            self._listener.on_reset(self._reloader.reset)
        await self._load_all()
        self._reloader.start()
        self._loop.start(self._sync_interval, now=False).addErrback(
            lambda f: self._log.failure("limits: the lease loop stopped", f)
        )
        # hourly, at a different moment on each node
        first = self._cleanup_interval * random.uniform(0.5, 1.0)
        self._cleanup_call = self._reactor.callLater(first, self._start_cleaner)
        self._log.info(
            "limits: {n} scopes with limits loaded (node {node})",
            n=len(self.limiter.scopes),
            node=self.node_id,
        )

    def _start_cleaner(self) -> None:
        self._cleaner.start(self._cleanup_interval, now=True).addErrback(
            lambda f: self._log.failure("limits: the cleanup loop stopped", f)
        )

    async def stop(self) -> None:
        """Give every unused lease and slot back, report what was
        consumed, leave the cluster (the proxy has drained by now)."""
        self._reloader.stop()
        for loop in (self._loop, self._cleaner):
            if loop.running:
                loop.stop()
        if getattr(self, "_cleanup_call", None) is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
        self.limiter.retire_all()
        try:
            await timeout_without_cancel(self.sync(), STOP_STEP_TIMEOUT, self._reactor)
            await timeout_without_cancel(
                ensureDeferred(self._store.leave(self.node_id)), STOP_STEP_TIMEOUT, self._reactor
            )
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn(
                "limits: could not hand the leases back at shutdown ({error}); they expire "
                "with their windows",
                error=f"{type(e).__name__}: {e}",
            )
        self._stopping = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        if self._webhook is not None:
            self._webhook.stop()

    # --- the cache of caps ----------------------------------------------------------------

    async def _load_all(self) -> None:
        rows = await self._store.load()
        by_org: dict[str, list] = {}
        for row in rows:
            by_org.setdefault(row.org_id, []).append((row.scope_id, row.key_id, _limits(row)))
        self.limiter.set_all(by_org)

    async def _load_orgs(self, org_ids: list[str]) -> None:
        rows = await self._store.load(org_ids)
        by_org: dict[str, list] = {org_id: [] for org_id in org_ids}
        for row in rows:
            by_org[row.org_id].append((row.scope_id, row.key_id, _limits(row)))
        for org_id, entries in by_org.items():
            self.limiter.set_org(org_id, entries)

    # --- lease rounds -----------------------------------------------------------------------

    def _kick(self) -> None:
        """From the hot path: an allowance runs low; start a round soon."""
        if self._stopping:
            return
        if self._running is not None:
            self._again = True
        elif self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._kicked)

    def _kicked(self) -> None:
        self._scheduled = None
        self._launch()

    def _tick(self) -> None:
        # (the LoopingCall must survive anything)
        try:
            if self.limiter.offline and self._reactor.seconds() < self._next_try:
                return
            self._launch()
        except Exception:
            self._log.failure("limits: starting a lease round failed")

    def _launch(self) -> None:
        if self._running is not None:
            self._again = True
            return
        d = ensureDeferred(self._rounds())
        d.addErrback(lambda f: self._log.failure("limits: lease rounds crashed", f))
        if not d.called:  # (a round with nothing to do ends at once)
            self._running = d

    def sync(self) -> Deferred[None]:
        """Fires once a lease round that started after this call has ended
        (tests, shutdown)."""
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._launch()
        return d

    async def _rounds(self) -> None:
        try:
            while True:
                self._again = False
                await self._round()
                if not self._again or self.limiter.offline:
                    break
        finally:
            self._running = None
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(None)

    async def _round(self) -> None:
        lim = self.limiter
        started = self._reactor.seconds()
        sweep = started - self._swept_at >= self._sweep_interval
        if sweep:
            self._swept_at = started
        draws, slots = lim.plan(started, sweep)
        beat = lim.has_limits and started - self._beat_at >= self._heartbeat_interval
        if not (draws or slots or beat or self._unclaimed):
            return
        watchdog = self._reactor.callLater(self._offline_after, self._too_slow)
        try:
            if draws:
                fresh = [self._draw(p) for p in draws if not p.counter.synced]
                results = await self._store.draw([self._draw(p) for p in draws], fresh)
                self._unclaimed += lim.apply_draws(draws, results, self._reactor.seconds())
            if slots:
                requests = [
                    SlotRequest(p.slots.scope_id, p.slots.org_id, p.in_use, p.want, p.slots.cap)
                    for p in slots
                ]
                held = await self._store.hold_slots(self.node_id, requests, self._slot_ttl)
                lim.apply_slots(slots, held, self._reactor.seconds())
            if beat:
                lim.nodes = await self._store.heartbeat(self.node_id, 6 * self._heartbeat_interval)
                self._beat_at = started
            if self._unclaimed:
                await self._announce()
        except CancelledError:
            raise
        except Exception as e:
            self._m_rounds.inc(1, "failed")
            self._failed(e)
            return
        finally:
            if watchdog.active():
                watchdog.cancel()
            self._m_round_seconds.observe(self._reactor.seconds() - started)
        self._m_rounds.inc(1, "ok")
        if lim.offline:
            self._back_online()

    @staticmethod
    def _draw(p) -> Draw:
        c = p.counter
        return Draw(
            c.scope_id, c.org_id, c.metric, as_datetime(c.start), p.debt, p.want, c.cap, p.spent
        )

    def _too_slow(self) -> None:
        if not self.limiter.offline:
            self._go_offline(f"a lease round has taken more than {self._offline_after:g}s")

    def _failed(self, e: Exception) -> None:
        if isinstance(e, _CONTENTION):
            self._log.info("limits: lease round lost a lock race; retrying")
            self._again = True
            return
        if not isinstance(e, DatabaseUnavailable | OperationTimedOut | psycopg2.Error):
            self._log.failure("limits: lease round failed unexpectedly")
        now = self._reactor.seconds()
        self._next_try = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self._max_retry)
        if not self.limiter.offline:
            self._go_offline(f"{type(e).__name__}: {e}")

    def _go_offline(self, reason: str) -> None:
        self.limiter.set_offline(True)
        self._offline_since = self._reactor.seconds()
        mode = (
            "then refusing (LECTR_LIMITS_FAIL_CLOSED)"
            if self.limiter.fail_closed
            else f"then enforcing each limit locally ({self.limiter.nodes} node(s) share it)"
        )
        self._log.warn(
            "limits: PostgreSQL unreachable ({reason}); working from the leases held, {mode}",
            reason=reason,
            mode=mode,
        )

    def _back_online(self) -> None:
        since = self._offline_since or self._reactor.seconds()
        self.limiter.set_offline(False)
        self._offline_since = None
        self._retry_delay = self._sync_interval
        self._again = True  # report what was consumed meanwhile, draw afresh
        self._log.info(
            "limits: PostgreSQL reachable again after {seconds:.1f}s; cluster-wide enforcement "
            "resumes",
            seconds=self._reactor.seconds() - since,
        )

    # --- budget alerts ---------------------------------------------------------------------

    async def _announce(self) -> None:
        pending, self._unclaimed = self._unclaimed, []
        claims = [
            AlertClaim(a.scope_id, a.org_id, a.budget, as_datetime(a.start), a.threshold)
            for a in pending
        ]
        try:
            won = await self._store.claim_alerts(claims)
        except BaseException:
            self._unclaimed = pending + self._unclaimed
            raise
        keys = {(w.scope_id, w.budget, w.window_start, w.threshold) for w in won}
        for alert, claim in zip(pending, claims, strict=True):
            if (claim.scope_id, claim.budget, claim.window_start, claim.threshold) in keys:
                self._emit(alert)

    def _emit(self, a: PendingAlert) -> None:
        self._m_alerts.inc(1, a.budget, str(a.threshold))
        who = f"key {a.key_id} of org {a.org_id}" if a.key_id else f"org {a.org_id}"
        period = "daily" if a.budget == "usd_per_day" else "monthly"
        self._log.warn(
            "budget alert: {who} has spent {percent}% of its {period} budget "
            "(${spent} of ${limit}; threshold {threshold}%)",
            who=who,
            percent=a.spent * 100 // a.cap,
            period=period,
            spent=usd_text(a.spent),
            limit=usd_text(a.cap),
            threshold=a.threshold,
        )
        if self._webhook is not None:
            self._webhook.send(
                {
                    "type": "budget.threshold_crossed",
                    "org_id": a.org_id,
                    "key_id": a.key_id,
                    "scope": "key" if a.key_id else "org",
                    "budget": a.budget,
                    "threshold_percent": a.threshold,
                    "limit_usd": usd_text(a.cap),
                    "spent_usd": usd_text(a.spent),
                    "window_start": as_datetime(a.start).isoformat(),
                    "window_end": as_datetime(a.end).isoformat(),
                    "created_at": as_datetime(self._reactor.seconds()).isoformat(),
                }
            )

    # --- upkeep ------------------------------------------------------------------------------

    def _cleanup(self) -> Deferred:
        d = ensureDeferred(self._store.cleanup())

        def done(n: int) -> None:
            if n:
                self._log.info("limits: {n} expired counter rows deleted", n=n)

        def failed(f) -> None:
            if not f.check(CancelledError):
                self._log.warn("limits: cleanup skipped ({error})", error=f.getErrorMessage())

        d.addCallbacks(done, failed)
        return d

    # --- administration ------------------------------------------------------------------------

    async def get(self, org_id: object, key_id: object = None) -> LimitsView:
        """The limits of an org (``key_id`` None) or of one of its keys."""
        org_id, key_id = self._ids(org_id, key_id)
        if not await self._store.scope_exists(org_id, key_id):
            raise NotFound("key not found" if key_id else "organization not found")
        row = await self._store.get(key_id or org_id)
        limits = _limits(row) if row is not None else Limits()
        updated = row.updated_at if row is not None else None
        return LimitsView(
            org_id, key_id, limits, updated, await self._usage(key_id or org_id, limits)
        )

    async def update(self, org_id: object, key_id: object, changes: object) -> LimitsView:
        """Set some limits (None removes one; fields not given keep their
        value). Every node applies the change when the notification arrives
        (well under a second)."""
        org_id, key_id = self._ids(org_id, key_id)
        cleaned = clean_changes(changes)
        row = await self._store.put(org_id, key_id, cleaned)
        if row is None:
            raise NotFound("key not found" if key_id else "organization not found")
        self._log.info(
            "limits of {scope} changed: {fields}",
            scope=f"key {key_id} of org {org_id}" if key_id else f"org {org_id}",
            fields=", ".join(f"{k}={_shown(v)}" for k, v in cleaned.items()),
        )
        try:
            await timeout_without_cancel(self._reloader.refresh(org_id), 5.0, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn(
                "limits cache of org {org_id} not refreshed yet ({error})",
                org_id=org_id,
                error=type(e).__name__,
            )
        limits = _limits(row)
        return LimitsView(
            org_id, key_id, limits, row.updated_at, await self._usage(key_id or org_id, limits)
        )

    @staticmethod
    def _ids(org_id: object, key_id: object) -> tuple[str, str | None]:
        org = parse_uuid(org_id, "organization")
        return org, (parse_uuid(key_id, "key") if key_id is not None else None)

    async def _usage(self, scope_id: str, limits: Limits) -> dict:
        """What the nodes reported for the current windows, for the limits
        that are set (a limit not set reads 0: nodes count only what a cap
        needs, and a count left from a cap removed is no usage of any)."""
        now = self._reactor.seconds()
        minute = as_datetime(minute_window(now)[0])
        windows = [
            ("requests", minute),
            ("tokens", minute),
            ("usd_day", as_datetime(day_window(now)[0])),
            ("usd_month", as_datetime(month_window(now)[0])),
        ]
        spent = await self._store.spent(scope_id, windows)

        def used(kind: str, cap: object) -> int:
            return spent.get(kind, 0) if cap is not None else 0

        return {
            "requests_this_minute": used("requests", limits.rpm),
            "tokens_this_minute": used("tokens", limits.tpm),
            "usd_today": usd_text(used("usd_day", limits.usd_per_day)),
            "usd_this_month": usd_text(used("usd_month", limits.usd_per_month)),
            "concurrent": await self._store.slots_in_use(scope_id)
            if limits.max_concurrent is not None
            else 0,
        }

    # --- introspection (tests, /metrics) ----------------------------------------------------

    @property
    def offline(self) -> bool:
        return self.limiter.offline


def _shown(value) -> str:
    return "none" if value is None else str(value)
