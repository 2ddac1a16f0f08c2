"""Admission and settlement in memory, on the reactor thread.

Every cap is enforced cluster-wide through counters in PostgreSQL, but
:meth:`Limiter.admit` never waits for the database: each node draws
allowance (a *lease*) from a counter ahead of need and spends it locally.
The manager (:mod:`lectr.limits.manager`) runs the lease rounds in the
background: it asks :meth:`Limiter.plan` what to draw, report and give back,
runs the round against PostgreSQL, and hands the answers to
:meth:`Limiter.apply_draws` / :meth:`Limiter.apply_slots`.

Per counter (a scope, a metric, a window) a node keeps:

- ``held``: what it has recorded in the database counter (leases drawn,
  plus consumption beyond them reported as debt, minus leases given back);
- ``spent``: settled consumption (requests admitted, tokens of finished
  requests, micro-dollars of their real cost), and ``reserved`` (the open
  worst-case reservations of dollar budgets);
- ``lease`` = ``ceil(lease_fraction × cap)`` (at least 1): the size of a
  draw, and the *credit*: how far the node may run ahead of what it holds
  while a draw is on its way. The credit is what bounds the overshoot:
  N nodes admit at most ``cap + N × lease`` per window (docs/limits.md);
- ``exhausted``: the last draw got less than it asked for, i.e. the cap is
  reached cluster-wide; no credit then, only what is held.

Concurrency works the same way with slots each node holds (``Slots``), kept
alive by heartbeats so that a crashed node's slots come back.

The hot path: most admissions are decided inline in :meth:`Limiter.admit`,
one comparison per limit against ``room`` (what the node holds less half a
lease): while every limit of the org and the key has room, the request
fits, no lease round is due, and nothing but the charge itself is written
(activity is kept per scope, not per counter). Anything else - a counter
running low, a window over, a counter the lease rounds stopped watching,
credit, a refusal - takes the careful path (``_check``, ``_charged``),
which decides exactly as before; a generated test plays any sequence of
requests, settlements, rounds and outages through both and compares.

When PostgreSQL cannot be reached, a node first spends what it holds, then
enforces its share of what was left alone (``local-only``): the remaining
allowance divided by the number of nodes it last saw; or, with
``fail_closed``, refuses (503).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from lectr.limits.model import (
    Limits,
    day_window,
    minute_window,
    month_window,
    reset_text,
    to_micro,
    usd_text,
)
from lectr.metrics import Registry

# outcomes of a check
OK, CREDIT, FULL, BUSY, UNAVAILABLE = range(5)

RATE_LIMITED = "rate_limit_exceeded"
BUDGET_EXCEEDED = "budget_exceeded"
LIMITS_UNAVAILABLE = "limits_unavailable"

_WINDOWS = {
    "requests": minute_window,
    "tokens": minute_window,
    "usd_day": day_window,
    "usd_month": month_window,
}
# metric -> (limit name, kind, how the message describes it)
_DESCRIBE = {
    "requests": ("rpm", RATE_LIMITED),
    "tokens": ("tpm", RATE_LIMITED),
    "usd_day": ("usd_per_day", BUDGET_EXCEEDED),
    "usd_month": ("usd_per_month", BUDGET_EXCEEDED),
}
ALERT_THRESHOLDS = (80, 100)

H_LIMIT_REQ = b"x-ratelimit-limit-requests"
H_REMAIN_REQ = b"x-ratelimit-remaining-requests"
H_RESET_REQ = b"x-ratelimit-reset-requests"
H_LIMIT_TOK = b"x-ratelimit-limit-tokens"
H_REMAIN_TOK = b"x-ratelimit-remaining-tokens"
H_RESET_TOK = b"x-ratelimit-reset-tokens"

# The headers of an admission, rendered in one formatting operation as
# response-head lines (see Admission.block): the limit, what remains, when
# the window resets.
_LINES = b"%s: %%s\r\n%s: %%d\r\n%s: %%s\r\n"
_BLOCK_REQ = _LINES % (H_LIMIT_REQ, H_REMAIN_REQ, H_RESET_REQ)
_BLOCK_TOK = _LINES % (H_LIMIT_TOK, H_REMAIN_TOK, H_RESET_TOK)
_BLOCK_BOTH = _BLOCK_REQ + _BLOCK_TOK


class Counter:
    """This node's share of one cluster-wide counter (see the module doc)."""

    __slots__ = (
        "scope",
        "scope_id",
        "org_id",
        "metric",
        "start",
        "end",
        "cap",
        "lease",
        "low",
        "room",
        "held",
        "spent",
        "reserved",
        "reported",
        "others",
        "global_spent",
        "exhausted",
        "synced",
        "retired",
        "open",
        "refused_at",
        "checked_at",
        "local_allow",
        "alerted",
        "limit_b",
        "reset_from",
        "reset_b",
        "watched",
    )

    def __init__(
        self, scope: Scope, metric: str, start: float, end: float, cap: int, fraction: float
    ):
        self.scope = scope  # (its activity is the counter's, see Limiter.plan)
        self.scope_id = scope.id
        self.org_id = scope.org_id
        self.metric = metric
        self.start = start
        self.end = end
        self.held = 0
        self.spent = 0
        self.reserved = 0
        self.reported = 0
        self.others = 0  # what the other nodes hold, as of the last draw
        self.global_spent = 0  # consumption reported by every node, as of the last draw
        self.synced = False  # the database row is known to exist
        self.open = 0  # admissions whose reservation is not settled yet
        self.refused_at = -math.inf
        self.checked_at = -math.inf
        self.alerted = 0  # bit i: ALERT_THRESHOLDS[i] claimed
        self.reset_from = math.inf  # the reset header, valid for one second from here
        self.reset_b = b""
        self.watched = False  # in the limiter's watch list (see Limiter.plan)
        self.set_cap(cap, fraction)

    def set_cap(self, cap: int, fraction: float) -> None:
        self.cap = cap
        self.lease = max(1, math.ceil(cap * fraction))
        self.low = (self.lease + 1) // 2
        # (a cap lowered below what this node holds: only what it allows is spendable)
        self.room = min(self.held, cap - self.others) - self.low
        self.exhausted = False
        self.retired = False
        self.local_allow: int | None = None
        self.limit_b = b"%d" % cap

    def remaining(self) -> int:
        return max(0, self.cap - self.others - self.spent - self.reserved)

    def reset(self, now: float) -> bytes:
        """Time to the end of the window, rounded up to whole seconds, the
        way x-ratelimit-reset-* write it."""
        start = self.reset_from
        if not start <= now < start + 1.0:
            secs = math.ceil(self.end - now)
            self.reset_from = self.end - secs
            self.reset_b = reset_text(secs)
        return self.reset_b


class Slots:
    """This node's share of a scope's concurrency cap."""

    __slots__ = (
        "scope",
        "scope_id",
        "org_id",
        "cap",
        "lease",
        "low",
        "room",
        "held",
        "in_use",
        "reported",
        "others",
        "exhausted",
        "retired",
        "refused_at",
        "checked_at",
        "local_allow",
    )

    def __init__(self, scope: Scope, cap: int, fraction: float) -> None:
        self.scope = scope
        self.scope_id = scope.id
        self.org_id = scope.org_id
        self.held = 0
        self.in_use = 0
        self.reported = 0
        self.others = 0
        self.refused_at = -math.inf
        self.checked_at = -math.inf
        self.set_cap(cap, fraction)

    def set_cap(self, cap: int, fraction: float) -> None:
        self.cap = cap
        self.lease = max(1, math.ceil(cap * fraction))
        self.low = (self.lease + 1) // 2
        # (a cap lowered below what this node holds: no credit, and only the
        # slots the new cap leaves are reused - see _fits_slot - until the
        # next round gives the rest back)
        self.exhausted = self.held > cap - self.others
        self.room = self.held - self.low if not self.exhausted else -1
        self.retired = False
        self.local_allow: int | None = None


class Scope:
    """An org or a Lectr key with limits, and its current counters."""

    __slots__ = (
        "id",
        "org_id",
        "key_id",
        "who",
        "limits",
        "rpm",
        "tpm",
        "max_concurrent",
        "usd_day",
        "usd_month",
        "req",
        "tok",
        "day",
        "month",
        "slots",
        "budgeted",
        "until",
        "active_at",
    )

    def __init__(self, scope_id: str, org_id: str, key_id: str | None) -> None:
        self.id = scope_id
        self.org_id = org_id
        self.key_id = key_id
        self.who = "key" if key_id is not None else "organization"
        self.limits = Limits()
        self.rpm = self.tpm = self.max_concurrent = self.usd_day = self.usd_month = None
        self.req = self.tok = self.day = self.month = None
        self.slots: Slots | None = None
        self.budgeted = False  # a dollar budget is set
        # the hot path decides inline until then: the end of the first of its
        # counters' windows, or -inf while one of them is not watched (see
        # Limiter._refresh)
        self.until = -math.inf
        # the last admission or settlement: the activity of every counter
        # and slot of the scope (read by Limiter.plan; the hot path writes
        # one attribute instead of one per counter)
        self.active_at = -math.inf


class _OrgEntry:
    __slots__ = ("org", "keys")

    def __init__(self) -> None:
        self.org: Scope | None = None
        self.keys: dict[str, Scope] = {}


class Refusal:
    """A request refused before any upstream call. ``kind`` is
    ``rate_limit_exceeded`` or ``budget_exceeded`` (status 429), or
    ``limits_unavailable`` (status 503: PostgreSQL is unreachable and
    LECTR_LIMITS_FAIL_CLOSED is set). ``limit`` names the cap (``rpm``,
    ``tpm``, ``max_concurrent``, ``usd_per_day``, ``usd_per_month``) and
    ``scope`` whose it is (``key`` or ``org``)."""

    __slots__ = ("status", "kind", "message", "retry_after", "headers", "limit", "scope")

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        retry_after: int,
        headers: list[tuple[bytes, bytes]],
        limit: str,
        scope: str,
    ) -> None:
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.headers = headers
        self.limit = limit
        self.scope = scope

    def __repr__(self) -> str:
        return f"<Refusal {self.status} {self.kind}: {self.message}>"


class Admission:
    """An admitted request. ``block`` goes on the response head as it is:
    its x-ratelimit-* headers, already rendered as head lines; ``headers``
    gives them as pairs. ``free`` gives the concurrency slots back when the
    answer is complete; ``settle`` is called once when the request ends
    (later calls do nothing), and frees them if ``free`` was not called."""

    __slots__ = ("block", "_limiter", "_parts", "_reserved", "_done", "_freed")

    def __init__(self, limiter: Limiter, parts: tuple = (), reserved: int = 0) -> None:
        self.block = b""
        self._limiter = limiter
        # per scope charged: (scope, its Slots, its tokens counter, its daily
        # and monthly counters holding the reservation), each None if unset
        self._parts = parts
        self._reserved = reserved  # the reservation (micro-dollars) in each dollar counter
        self._done = False
        self._freed = False  # (its concurrency slots given back)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """``block`` as (name, value) pairs (error responses, tests)."""
        return _pairs(self.block)

    def free(self) -> None:
        """Give the concurrency slots back: the answer is complete (sent at
        the end of this turn), so the request is no longer in flight,
        though it is recorded and settled after the send. The next request
        pipelined on its connection starts at once and must find them
        free, as a client sending each request after the last answer
        does."""
        if self._freed or self._done:
            return
        self._freed = True
        for part in self._parts:
            slots = part[1]
            if slots is not None:
                slots.in_use -= 1

    def settle(self, *, tokens: int | None, cost_usd: Decimal | int | None) -> None:
        """Release the concurrency slots (unless freed), charge the tokens to the current
        minute, replace the dollar reservations by ``cost_usd`` (a Decimal in
        USD or an int in whole micro-dollars; None: nothing to charge, e.g.
        refused later in the chain, or unpriced)."""
        if self._done:
            return
        self._done = True
        self._limiter._settle(self, tokens, cost_usd)


def _pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        out.append((name, value))
    return out


class _NoLimits(Admission):
    """The shared admission of requests no limit applies to."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]

    def free(self) -> None:
        return None

    def settle(self, *, tokens: int | None, cost_usd: Decimal | None) -> None:
        return None


NO_LIMITS: Admission = _NoLimits()


@dataclass(slots=True)
class PlannedDraw:
    counter: Counter
    debt: int
    want: int
    spent: int


@dataclass(slots=True)
class PlannedSlots:
    slots: Slots
    in_use: int
    want: int


@dataclass(slots=True)
class PendingAlert:
    """A budget threshold this node saw crossed (to be claimed in the
    cluster before it is announced)."""

    scope_id: str
    org_id: str
    key_id: str | None
    budget: str  # usd_per_day | usd_per_month
    threshold: int
    cap: int  # micro-dollars
    spent: int  # micro-dollars, reported by every node
    start: float
    end: float


def _longer(refusal: Refusal | None, other: Refusal | None) -> Refusal | None:
    """Of two refusals (either may be None), the one with the longer wait
    (the first on a tie): a retry before it ends would only be refused
    again."""
    if other is None or (refusal is not None and other.retry_after <= refusal.retry_after):
        return refusal
    return other


class Limiter:
    def __init__(
        self,
        *,
        clock,
        lease_fraction: float = 0.05,
        fail_closed: bool = False,
        idle_return: float = 2.0,
        refresh: float = 0.5,
        recheck: float = 1.0,
        slot_heartbeat: float = 5.0,
        unavailable_retry: int = 5,
        metrics: Registry | None = None,
        kick: Callable[[], None] | None = None,
        inline: bool = True,
    ) -> None:
        """``inline`` False: every admission takes the careful path (tests
        prove the inline one decides the same)."""
        if not 0 < lease_fraction <= 1:
            raise ValueError("lease_fraction must be in (0, 1]")
        self._clock = clock
        self.fraction = lease_fraction
        self.fail_closed = fail_closed
        self.idle_return = idle_return
        self.refresh = refresh
        self.recheck = recheck
        self.slot_heartbeat = slot_heartbeat
        self.unavailable_retry = unavailable_retry
        self.inline = inline
        self._orgs: dict[str, _OrgEntry] = {}
        #: the orgs with a limit on them or on one of their keys (read-only:
        #: the policy step skips the rest without a call)
        self.limited_orgs: Mapping[str, object] = self._orgs
        self.scopes: dict[str, Scope] = {}
        self.counters: dict[tuple[str, str, int], Counter] = {}
        # counters touched lately: what a lease round looks at (all of them
        # only in a sweep, which forgets the windows that are over)
        self._watch: list[Counter] = []
        self.slots: dict[str, Slots] = {}
        self.offline = False
        self.nodes = 1  # nodes seen alive lately (the share of each when offline)
        self.kicked = False
        self._kick = kick or (lambda: None)
        registry = metrics or Registry()
        self._m_refused = registry.counter(
            "lectr_limit_refusals_total",
            "Requests refused by a limit or budget, by limit and scope (org or key)",
            ["limit", "scope"],
        )
        self._m_unpriced = registry.counter(
            "lectr_limit_unpriced_total",
            "Requests under a dollar budget that ended without a cost (nothing charged)",
        )

    # --- configuration --------------------------------------------------------------

    def set_org(self, org_id: str, entries: list[tuple[str, str | None, Limits]]) -> None:
        """Replace the org's scopes by ``entries`` (scope id, key id or None,
        limits). Counters and slots of scopes that stay keep their state."""
        wanted = {scope_id: (key_id, limits) for scope_id, key_id, limits in entries}
        entry = self._orgs.get(org_id)
        if entry is not None:
            for scope in [entry.org, *entry.keys.values()]:
                if scope is not None and scope.id not in wanted:
                    self._configure(scope, Limits())
                    self._forget(scope)
        for scope_id, (key_id, limits) in wanted.items():
            if limits.empty:
                continue
            scope = self.scopes.get(scope_id)
            if scope is None:
                scope = self.scopes[scope_id] = Scope(scope_id, org_id, key_id)
                entry = self._orgs.get(org_id)
                if entry is None:
                    entry = self._orgs[org_id] = _OrgEntry()
                if key_id is None:
                    entry.org = scope
                else:
                    entry.keys[key_id] = scope
            self._configure(scope, limits)

    def set_all(self, by_org: dict[str, list[tuple[str, str | None, Limits]]]) -> None:
        for org_id in list(self._orgs):
            if org_id not in by_org:
                self.set_org(org_id, [])
        for org_id, entries in by_org.items():
            self.set_org(org_id, entries)

    def _forget(self, scope: Scope) -> None:
        self.scopes.pop(scope.id, None)
        entry = self._orgs.get(scope.org_id)
        if entry is None:
            return
        if scope.key_id is None:
            if entry.org is scope:
                entry.org = None
        elif entry.keys.get(scope.key_id) is scope:
            del entry.keys[scope.key_id]
        if entry.org is None and not entry.keys:
            del self._orgs[scope.org_id]

    def _configure(self, scope: Scope, limits: Limits) -> None:
        scope.limits = limits
        scope.rpm = limits.rpm
        scope.tpm = limits.tpm
        scope.max_concurrent = limits.max_concurrent
        scope.usd_day = to_micro(limits.usd_per_day) if limits.usd_per_day is not None else None
        scope.usd_month = (
            to_micro(limits.usd_per_month) if limits.usd_per_month is not None else None
        )
        now = self._clock.seconds()
        for attr, metric, cap in (
            ("req", "requests", scope.rpm),
            ("tok", "tokens", scope.tpm),
            ("day", "usd_day", scope.usd_day),
            ("month", "usd_month", scope.usd_month),
        ):
            counter: Counter | None = getattr(scope, attr)
            if cap is None:
                if counter is not None:
                    counter.retired = True
                    setattr(scope, attr, None)
            elif counter is None or now >= counter.end:
                self._counter(scope, metric, now)
            elif cap != counter.cap:
                counter.set_cap(cap, self.fraction)
        slots = scope.slots
        if scope.max_concurrent is None:
            if slots is not None:
                slots.retired = True
                scope.slots = None
        elif slots is None or scope.max_concurrent != slots.cap:
            self._slots(scope)
        self._refresh(scope)

    def _refresh(self, scope: Scope) -> None:
        """What the hot path reads of a scope's counters: is a dollar budget
        set, until when may it decide inline (the end of the first window;
        never while a counter is not in the watch list: only the careful
        path puts it back)."""
        scope.budgeted = scope.day is not None or scope.month is not None
        until = math.inf if self.inline else -math.inf
        for c in (scope.req, scope.tok, scope.day, scope.month):
            if c is not None:
                if not c.watched:
                    until = -math.inf
                    break
                if c.end < until:
                    until = c.end
        scope.until = until

    # --- the hot path -------------------------------------------------------------------

    def admit(
        self, org_id: str, key_id: str, *, reserve_usd: Decimal | None
    ) -> Admission | Refusal:
        """Admit or refuse one request, in memory. ``reserve_usd``: its
        worst-case cost (a Decimal in USD, or an int in whole micro-dollars),
        reserved against the dollar budgets until :meth:`Admission.settle` -
        or a function returning it, called only when a dollar budget applies
        (pricing a request costs time the common case need not spend); None
        (unpriced): it is admitted while the budgets have room, and charged
        the cost given at settlement, if any."""
        entry = self._orgs.get(org_id)
        if entry is None:
            return NO_LIMITS
        key_scope = entry.keys.get(key_id)
        org_scope = entry.org
        if key_scope is None:
            if org_scope is None:
                return NO_LIMITS
            scopes: tuple[Scope, ...] = (org_scope,)
        elif org_scope is None:
            scopes = (key_scope,)
        else:
            scopes = (key_scope, org_scope)
        now = self._clock.seconds()
        reserve = None
        if reserve_usd is not None:
            for scope in scopes:
                if scope.budgeted:
                    if callable(reserve_usd):
                        reserve_usd = reserve_usd()
                    if type(reserve_usd) is int:
                        reserve = reserve_usd
                    elif reserve_usd is not None:
                        reserve = to_micro(reserve_usd)
                    break
        # The common case, decided inline: every limit of every scope well
        # inside what this node holds - room for the request and, after it,
        # still at least ``low`` (``room`` = held - low: no draw to ask for,
        # nothing to kick), no window over, every counter watched. Anything
        # else takes the careful path (_check, then the bookkeeping of
        # _charged).
        for scope in scopes:
            if now >= scope.until:
                break
            c = scope.req
            if c is not None and c.spent >= c.room:
                break
            c = scope.tok
            if c is not None and c.spent > c.room:
                break
            sl = scope.slots
            if sl is not None and sl.in_use >= sl.room:  # (room -1 while exhausted)
                break
            if scope.budgeted:
                need = reserve or 1
                c = scope.day
                if c is not None and c.spent + c.reserved + need > c.room:
                    break
                c = scope.month
                if c is not None and c.spent + c.reserved + need > c.room:
                    break
        else:
            admission = self._charge(scopes, now, reserve)
            admission.block = self._block(scopes, now)
            return admission
        refusal = None
        for scope in scopes:
            refusal = _longer(refusal, self._check(scope, now, reserve))
        if refusal is not None:
            self._m_refused.inc(1, refusal.limit, refusal.scope)
            refusal.headers = self._headers(scopes, now, refusal.retry_after)
            return refusal
        admission = self._charge(scopes, now, reserve)
        self._charged(scopes)
        admission.block = self._block(scopes, now)
        return admission

    def _counter(self, scope: Scope, metric: str, now: float) -> Counter:
        """The scope's counter of the window ``now`` is in (a new window:
        a new counter, or the one kept from before a reconfiguration)."""
        start, end = _WINDOWS[metric](now)
        cap = {
            "requests": scope.rpm,
            "tokens": scope.tpm,
            "usd_day": scope.usd_day,
            "usd_month": scope.usd_month,
        }[metric]
        key = (scope.id, metric, int(start))
        counter = self.counters.get(key)
        if counter is None:
            counter = self.counters[key] = Counter(scope, metric, start, end, cap, self.fraction)
        elif counter.retired or counter.cap != cap:
            counter.set_cap(cap, self.fraction)
        counter.scope = scope
        if not counter.watched:
            counter.watched = True
            self._watch.append(counter)
        attr = {"requests": "req", "tokens": "tok", "usd_day": "day", "usd_month": "month"}[metric]
        setattr(scope, attr, counter)
        self._refresh(scope)
        return counter

    def _fits(self, c: Counter, need: int, later: bool = False) -> int:
        """May ``need`` more be consumed? ``later``: the real amount is only
        known at settlement (tokens, unpriced requests under a budget)."""
        load = c.spent + c.reserved + need
        if load <= c.room + c.low:  # what it holds, or less under a cap lowered since
            return OK
        if self.offline:
            if self.fail_closed:
                return UNAVAILABLE
            allow = c.local_allow
            if allow is None:
                remaining = max(0, c.cap - c.others - c.held)
                allow = c.local_allow = c.held + -(-remaining // max(1, self.nodes))
            return OK if load <= allow else FULL
        if c.exhausted or c.others + load > c.cap:
            return FULL
        # credit: run ahead of what is held while less than a lease is owed
        if later or load - need - c.held < c.lease:
            return CREDIT
        return BUSY

    def _fits_slot(self, s: Slots) -> int:
        # (a node holding more than the others leave — its in-flight
        # requests on credit — only reuses what the cap allows)
        if s.in_use < s.held and (not s.exhausted or s.in_use < s.cap - s.others):
            return OK
        if self.offline:
            if self.fail_closed:
                return UNAVAILABLE
            allow = s.local_allow
            if allow is None:
                remaining = max(0, s.cap - s.others - s.held)
                allow = s.local_allow = s.held + -(-remaining // max(1, self.nodes))
            return OK if s.in_use < allow else FULL
        if s.exhausted:
            return FULL
        return CREDIT if s.in_use + 1 - s.held <= s.lease else BUSY

    def _check(self, scope: Scope, now: float, reserve: int | None) -> Refusal | None:
        """The scope's refusal of a request, or None: of the limits that
        refuse, the one with the longest wait (a spent budget over a full
        minute: a retry after the minute would only be refused again)."""
        refusal = self._check_minute(scope, now)
        if scope.budgeted:
            refusal = _longer(refusal, self._check_budgets(scope, now, reserve))
        return refusal

    def _check_minute(self, scope: Scope, now: float) -> Refusal | None:
        # (each limit first tries the common case inline: covered by what
        # the node holds - ``room + low``: that, or less under a cap lowered
        # since; both minute counters move to a new minute before either
        # refuses: a refusal's x-ratelimit-* headers are read from both)
        # (of rpm and tpm, the longer wait: a token minute spent outlasts
        # a request counter waiting a moment for its lease; max_concurrent's
        # second is never longer than either)
        c = scope.tok
        if c is not None and now >= c.end:
            self._counter(scope, "tokens", now)
        refusal = None
        c = scope.req
        if c is not None:
            if now >= c.end:
                c = self._counter(scope, "requests", now)
            if c.spent + c.reserved >= c.room + c.low:
                verdict = self._fits(c, 1)
                if verdict > CREDIT:
                    refusal = self._refuse(scope, c, verdict, now)
        c = scope.tok
        if c is not None:
            if c.spent >= c.room + c.low:
                verdict = self._fits(c, 1, True)
                if verdict > CREDIT:
                    refusal = _longer(refusal, self._refuse(scope, c, verdict, now))
        if refusal is not None:
            return refusal
        s = scope.slots
        if s is not None and (s.in_use >= s.held or s.exhausted):
            verdict = self._fits_slot(s)
            if verdict > CREDIT:
                s.refused_at = now
                return self._refuse_slot(scope, verdict)
        return None

    def _check_budgets(self, scope: Scope, now: float, reserve: int | None) -> Refusal | None:
        # (of the two, the longer wait: a month spent outlasts its day)
        need = reserve or 1
        refusal = None
        for c, metric in ((scope.day, "usd_day"), (scope.month, "usd_month")):
            if c is None:
                continue
            if now >= c.end:
                c = self._counter(scope, metric, now)
            if c.spent + c.reserved + need > c.room + c.low:
                verdict = self._fits(c, need, reserve is None)
                if verdict > CREDIT:
                    refusal = _longer(refusal, self._refuse(scope, c, verdict, now))
        return refusal

    def _slots(self, scope: Scope) -> Slots:
        s = self.slots.get(scope.id)
        if s is None:
            s = self.slots[scope.id] = Slots(scope, scope.max_concurrent, self.fraction)
        elif s.retired or s.cap != scope.max_concurrent:
            s.set_cap(scope.max_concurrent, self.fraction)
        s.scope = scope
        scope.slots = s
        return s

    def _charge(self, scopes: tuple[Scope, ...], now: float, reserve: int | None) -> Admission:
        """Charge an admitted request to every scope (the request, a slot,
        the reservation); the admission keeps what to settle."""
        amount = reserve or 0
        parts = []
        for scope in scopes:
            scope.active_at = now
            c = scope.req
            if c is not None:
                c.spent += 1
            sl = scope.slots
            if sl is not None:
                sl.in_use += 1
            day = month = None
            if scope.budgeted:
                day = scope.day
                if day is not None:
                    day.reserved += amount
                    day.open += 1
                month = scope.month
                if month is not None:
                    month.reserved += amount
                    month.open += 1
            parts.append((scope, sl, scope.tok, day, month))
        return Admission(self, tuple(parts), amount)

    def _charged(self, scopes: tuple[Scope, ...]) -> None:
        """After a charge on the careful path: every counter watched, and a
        lease round kicked when one runs low."""
        kick = False
        watch = self._watch
        for scope in scopes:
            for c in (scope.req, scope.tok, scope.day, scope.month):
                if c is None:
                    continue
                if c.held - c.spent - c.reserved < c.low:
                    kick = True
                if not c.watched:
                    c.watched = True
                    watch.append(c)
            sl = scope.slots
            if sl is not None and sl.held - sl.in_use < sl.low:
                kick = True
            self._refresh(scope)
        if kick and not self.kicked and not self.offline:
            self.kicked = True
            self._kick()

    def _settle(
        self, admission: Admission, tokens: int | None, cost_usd: Decimal | int | None
    ) -> None:
        # (no lease round is kicked from here: consumption that leaves a
        # counter low sends the next admission down the careful path, which
        # kicks one; the dollar counters stay watched while a reservation
        # is open - see plan)
        now = self._clock.seconds()
        cost = -1  # (converted once, when a dollar counter needs it)
        reserved = admission._reserved
        freed = admission._freed
        for scope, sl, tok, day, month in admission._parts:
            scope.active_at = now
            if sl is not None and not freed:
                sl.in_use -= 1
            if tokens and tok is not None:
                c = scope.tok
                if c is not None:  # (None: the limit was removed meanwhile)
                    if now >= c.end:
                        c = self._counter(scope, "tokens", now)
                    c.spent += tokens
                    if not c.watched:  # (a stream longer than the idle time)
                        c.watched = True
                        self._watch.append(c)
            if day is None and month is None:
                continue
            if cost < 0:
                if cost_usd is None:
                    cost = 0
                    if tokens:
                        self._m_unpriced.inc()
                else:
                    cost = cost_usd if type(cost_usd) is int else to_micro(cost_usd)
            if day is not None:
                day.reserved -= reserved
                day.spent += cost
                day.open -= 1
            if month is not None:
                month.reserved -= reserved
                month.spent += cost
                month.open -= 1

    # --- answers -----------------------------------------------------------------------

    def _refuse(self, scope: Scope, c: Counter, verdict: int, now: float) -> Refusal:
        c.refused_at = now
        if not c.watched:
            c.watched = True
            self._watch.append(c)
        limit, kind = _DESCRIBE[c.metric]
        who = scope.who
        short = "org" if scope.key_id is None else "key"
        if verdict == UNAVAILABLE:
            return _unavailable(scope, limit, self.unavailable_retry)
        if c.metric == "requests":
            what = f"requests per minute limit of the {who}"
            cap = f"{c.cap}/min"
        elif c.metric == "tokens":
            what = f"tokens per minute limit of the {who}"
            cap = f"{c.cap}/min"
        elif c.metric == "usd_day":
            what = f"daily budget of the {who}"
            cap = f"${usd_text(c.cap)} per UTC day"
        else:
            what = f"monthly budget of the {who}"
            cap = f"${usd_text(c.cap)} per calendar month (UTC)"
        if verdict == BUSY:
            # the node ran through its credit before its next lease arrived
            return Refusal(
                429,
                kind,
                f"{what} ({cap}): no allowance on this node for a moment; retry shortly",
                1,
                [],
                limit,
                short,
            )
        retry = max(1, math.ceil(c.end - now))
        return Refusal(429, kind, f"{what} reached ({cap})", retry, [], limit, short)

    def _refuse_slot(self, scope: Scope, verdict: int) -> Refusal:
        short = "org" if scope.key_id is None else "key"
        if verdict == UNAVAILABLE:
            return _unavailable(scope, "max_concurrent", self.unavailable_retry)
        what = f"concurrent requests limit of the {scope.who}"
        if verdict == BUSY:
            message = f"{what} ({scope.max_concurrent}): no slot on this node for a moment"
        else:
            message = f"{what} reached ({scope.max_concurrent})"
        return Refusal(429, RATE_LIMITED, message, 1, [], "max_concurrent", short)

    def _headers(
        self, scopes: tuple[Scope, ...], now: float, retry: int
    ) -> list[tuple[bytes, bytes]]:
        """A refusal's headers: ``retry-after`` (``retry`` seconds) and the
        x-ratelimit-* headers (see :meth:`_block`)."""
        out = [(b"retry-after", b"%d" % retry), (b"retry-after-ms", b"%d" % (retry * 1000))]
        return out + _pairs(self._block(scopes, now))

    def _block(self, scopes: tuple[Scope, ...], now: float) -> bytes:
        """The OpenAI-style headers of the tightest request and token limits,
        rendered as response-head lines (from numbers and constants only:
        the server writes them unchecked)."""
        req = tok = None
        req_left = tok_left = 0
        for scope in scopes:
            c = scope.req
            if c is not None:
                left = c.cap - c.others - c.spent
                if req is None or left < req_left:
                    req, req_left = c, left
            c = scope.tok
            if c is not None:
                left = c.cap - c.others - c.spent
                if tok is None or left < tok_left:
                    tok, tok_left = c, left
        if req is not None:
            if req_left < 0:
                req_left = 0
            if tok is None:
                return _BLOCK_REQ % (req.limit_b, req_left, req.reset(now))
            if tok_left < 0:
                tok_left = 0
            return _BLOCK_BOTH % (
                req.limit_b,
                req_left,
                req.reset(now),
                tok.limit_b,
                tok_left,
                tok.reset(now),
            )
        if tok is not None:
            if tok_left < 0:
                tok_left = 0
            return _BLOCK_TOK % (tok.limit_b, tok_left, tok.reset(now))
        return b""

    # --- lease rounds (run by the manager) -------------------------------------------------

    def plan(self, now: float, sweep: bool = False) -> tuple[list[PlannedDraw], list[PlannedSlots]]:
        """What the next round must do: per counter the debt to record (or
        the unused lease to give back), what to draw, the consumption to
        report; per concurrency scope the slots to hold. Looks at the
        counters touched lately; a ``sweep`` looks at every counter and
        forgets those whose window is over and fully reported."""
        self.kicked = False
        draws: list[PlannedDraw] = []
        watch, self._watch = self._watch, []
        if sweep:
            for c in self.counters.values():
                if not c.watched:
                    c.watched = True
                    watch.append(c)
        for c in watch:
            load = c.spent + c.reserved
            debt = load - c.held if load > c.held else 0
            free = c.held + debt - load
            spent = c.spent - c.reported
            want = 0
            current = now < c.end
            recent = False
            if current and not c.retired:
                recent = (
                    now - c.scope.active_at < self.idle_return
                    or now - c.refused_at < self.idle_return
                )
                # an active counter hears of the other nodes at least this often
                due = recent and now - c.checked_at >= self.refresh
                if c.exhausted:
                    if due:
                        want = max(1, c.lease - free)
                elif free < c.low and recent:
                    want = c.lease - free
                if not want and not debt and free > 0 and not recent:
                    debt = -free  # idle: give the unused lease back
                elif not debt and free > c.lease and c.held > c.cap - c.others:
                    # holding more than the cap leaves (a cap lowered): keep one
                    # lease, give the rest back so that the other nodes can spend it
                    debt = c.lease - free
                include = debt or want or spent or due
            else:
                if current and free > 0 and not debt:
                    debt = -free  # the limit was removed
                include = debt or spent
            if include or recent:
                self._watch.append(c)  # still watched
                if include:
                    draws.append(PlannedDraw(c, debt, want, spent))
                continue
            c.watched = False
            c.scope.until = -math.inf  # (the careful path watches it again)
            if c.open == 0 and (not current or c.retired):
                key = (c.scope_id, c.metric, int(c.start))
                if self.counters.get(key) is c:
                    del self.counters[key]
            elif c.open:
                c.watched = True  # a reservation is still open
                self._watch.append(c)
        slots: list[PlannedSlots] = []
        for scope_id, s in list(self.slots.items()):
            recent = now - s.scope.active_at < self.idle_return and not s.retired
            want = s.in_use + (s.lease if recent else 0)
            free = s.held - s.in_use
            if s.exhausted and want > s.held:
                ask = s.refused_at >= s.checked_at and now - s.checked_at >= self.recheck
            else:
                ask = (recent and free < s.low) or free > (2 * s.lease if recent else 0)
            # holding more than the cap leaves (taken on credit): give it back
            ask = ask or s.held > max(s.in_use, s.cap - s.others)
            beat = (s.held or s.in_use or s.reported) and now - s.checked_at >= self.slot_heartbeat
            if ask or beat:
                slots.append(PlannedSlots(s, s.in_use, want))
            elif s.retired and s.in_use == 0 and s.held == 0:
                del self.slots[scope_id]
        return draws, slots

    def apply_draws(self, planned: list[PlannedDraw], results, now: float) -> list[PendingAlert]:
        """Take in a round's answers (``lectr.storage.limits.Drawn``);
        returns the budget thresholds seen crossed."""
        by_key = {(r.scope_id, r.metric, int(r.window_start.timestamp())): r for r in results}
        alerts: list[PendingAlert] = []
        for p in planned:
            c = p.counter
            r = by_key.get((c.scope_id, c.metric, int(c.start)))
            if r is None:  # the row was missing: create it next round
                c.synced = False
                continue
            c.held += p.debt + r.grant
            c.reported += p.spent
            c.others = max(0, r.used - c.held)
            c.room = min(c.held, c.cap - c.others) - c.low
            c.global_spent = r.spent
            c.synced = True
            c.checked_at = now
            if r.used >= c.cap:
                c.exhausted = True  # fully allocated: no more credit anywhere
            elif p.want > 0:
                c.exhausted = r.grant < p.want
            c.local_allow = None
            if c.metric in ("usd_day", "usd_month") and not c.retired:
                for bit, threshold in enumerate(ALERT_THRESHOLDS):
                    if not c.alerted & (1 << bit) and r.spent * 100 >= threshold * c.cap:
                        c.alerted |= 1 << bit
                        scope = self.scopes.get(c.scope_id)
                        alerts.append(
                            PendingAlert(
                                c.scope_id,
                                c.org_id,
                                scope.key_id if scope is not None else None,
                                "usd_per_day" if c.metric == "usd_day" else "usd_per_month",
                                threshold,
                                c.cap,
                                r.spent,
                                c.start,
                                c.end,
                            )
                        )
        return alerts

    def apply_slots(self, planned: list[PlannedSlots], results, now: float) -> None:
        by_scope = {r.scope_id: r for r in results}
        for p in planned:
            s = p.slots
            r = by_scope.get(s.scope_id)
            if r is None:
                continue
            s.held = r.held
            s.others = r.others
            s.reported = p.in_use
            s.checked_at = now
            # (an answer computed under a cap lowered since it was asked
            # for holds more than the cap now leaves: no credit, and only
            # what the cap allows is reused - as set_cap decided)
            s.exhausted = r.held < p.want or r.held > s.cap - r.others
            s.room = s.held - s.low if not s.exhausted else -1
            s.local_allow = None

    def set_offline(self, offline: bool) -> None:
        """PostgreSQL became unreachable (or reachable again): the shares
        of local-only enforcement are computed afresh."""
        self.offline = offline
        for c in self.counters.values():
            c.local_allow = None
        for s in self.slots.values():
            s.local_allow = None

    def retire_all(self) -> None:
        """Shutting down: the next plan gives every unused lease and slot
        back (and reports what was consumed)."""
        for c in self.counters.values():
            c.retired = True
            if not c.watched:
                c.watched = True
                self._watch.append(c)
        for s in self.slots.values():
            s.retired = True

    @property
    def has_limits(self) -> bool:
        return bool(self.scopes)


def _unavailable(scope: Scope, limit: str, retry: int) -> Refusal:
    return Refusal(
        503,
        LIMITS_UNAVAILABLE,
        f"the limits of the {scope.who} cannot be checked right now (database unreachable); "
        "retry later",
        retry,
        [],
        limit,
        "org" if scope.key_id is None else "key",
    )
