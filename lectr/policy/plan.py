"""The routing plan of one request, and how each attempt's target and key
are chosen.

The route step (:mod:`lectr.policy.route`) makes a :class:`RoutingPlan`:
the candidate targets (one for a plain request; a route's targets
otherwise), the retry policy and the limits on attempts. Later steps filter
the targets (provider enabled, model allowed, a key to use). The attempt
loop then asks :meth:`RoutingPlan.first` and, after each failure that may be
retried, :meth:`RoutingPlan.next`.

Failures are of two kinds:

- *key failures* (the provider refused the key: 401/403, or rate-limited
  it: 429): the key cools down (:mod:`lectr.policy.health`) and the next key
  of the same target's pool is tried; when the pool has no other key, the
  next target (a 429 only when the route retries on ``429``);
- *target failures* (5xx, no response headers in time, no connection): the
  next target, when the route retries on that class.

A plain request (no route) retries key failures only, within its pool.

Cool-downs order a route's targets too: a target whose every key is cooling
down comes after those with a healthy key (still tried, last).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lectr.managers.routes import Route, Target
from lectr.policy.select import RoundRobin, rendezvous_order

#: attempts of a plain request (key failures within its pool)
PLAIN_MAX_ATTEMPTS = 3

_KEY_FAILURES = {401: "refused", 403: "refused", 429: "429"}


@dataclass(slots=True)
class Attempt:
    n: int  # 1-based
    target: Target
    provider: object  # lectr.providers.base.Provider
    key: object  # lectr.managers.vault.PoolKey


class Selector:
    """Picks keys and orders targets: cooling keys last, sticky per
    conversation when there is one, smooth weighted round-robin otherwise."""

    def __init__(self, vault, health, registry, rr: RoundRobin | None = None) -> None:
        self.vault = vault
        self.health = health
        self.registry = registry
        self._rr = RoundRobin() if rr is None else rr

    def fork(self) -> Selector:
        """A selector that makes the choices this one would make next, from
        its round-robin state, without changing that state (explain)."""
        return Selector(self.vault, self.health, self.registry, self._rr.fork())

    def order_targets(self, plan: RoutingPlan, org_id: str) -> list[Target]:
        """The route's targets in the order to try them; those whose every
        key is cooling down go after the others (keeping each group's
        order): a cool-down sets a key aside while another target has a
        healthy one, and is only a preference when none has."""
        targets = plan.targets
        if len(targets) < 2 or plan.route is None:
            return list(targets)
        cooling = self._cooling_targets(targets, org_id) if self.health.cooling() else None
        if plan.route.strategy != "weighted":
            order = list(targets)
        else:
            affinity = plan.affinity()
            if affinity is not None:
                order = rendezvous_order(affinity, targets, _target_id, _weight)
            else:
                # the split is among the targets that can serve
                serving = targets if cooling is None else [t for t in targets if t not in cooling]
                first = self._rr.pick(
                    ("route", org_id, plan.route.name), serving, _target_id, _weight
                )
                rest = sorted((t for t in targets if t is not first), key=_weight, reverse=True)
                order = [first, *rest]
        if cooling is not None:
            order = [t for t in order if t not in cooling] + [t for t in order if t in cooling]
        return order

    def _cooling_targets(self, targets: list[Target], org_id: str) -> list[Target] | None:
        """The targets whose every key is cooling down (None when there are
        none, or when every target's are)."""
        vault = self.vault
        healthy = self.health.healthy
        cooling = [
            t
            for t in targets
            if not any(healthy(k.id) and vault.usable(k) for k in vault.pool(org_id, t.provider))
        ]
        return cooling if cooling and len(cooling) < len(targets) else None

    def pick_key(
        self, plan: RoutingPlan, org_id: str, target: Target, first: bool, tried=frozenset()
    ):
        """A key of ``target``'s pool, not in ``tried`` (the keys this target
        already used, and those its provider refused or rate-limited)."""
        pool = self.vault.pool(org_id, target.provider)
        vault = self.vault
        if len(pool) == 1:  # the common case
            key = pool[0]
            return key if key.id not in tried and vault.usable(key) else None
        candidates = [k for k in pool if k.id not in tried and vault.usable(k)]
        if not candidates:
            return None
        health = self.health
        healthy = [k for k in candidates if health.healthy(k.id)]
        if not healthy:  # every key is cooling down: the one that comes back first
            return min(candidates, key=lambda k: health.remaining(k.id))
        if len(healthy) == 1:
            return healthy[0]
        affinity = plan.affinity()
        if affinity is not None:
            return rendezvous_order(affinity, healthy, _key_id, _weight)[0]
        if first:
            return self._rr.pick((org_id, target.provider), healthy, _key_id, _weight)
        return max(healthy, key=_weight)

    def has_key(self, org_id: str, provider: str) -> bool:
        return bool(self.vault.pool(org_id, provider))


def _target_id(t: Target) -> str:
    return f"{t.provider}/{t.model}"


def _key_id(k) -> str:
    return k.id


def _weight(c) -> int:
    return c.weight


#: the part of an x-lectr-session header that counts
SESSION_MAX = 512


def request_affinity(headers, dialect, read) -> bytes | None:
    """What ties a request to a conversation, for sticky key and target
    choice: the ``x-lectr-session`` header (its first SESSION_MAX bytes),
    the body's session fields, or a digest of a cacheable prompt prefix.
    The proxy and the explain API both use this, so that explain shows the
    key the proxy would pick."""
    session = headers.first(b"x-lectr-session")
    if session:
        return b"s:" + session[:SESSION_MAX]
    facts = read.facts if read is not None else None
    if facts is not None:  # a large body, judged in another process
        key = facts.session_key
    else:
        doc = read.doc if read is not None else None
        key = dialect.session_key(doc)
    if key is not None:
        return b"s:" + key.encode("utf-8", "surrogatepass")
    if facts is not None:
        prefix = facts.cache_prefix
    else:
        prefix = dialect.cache_prefix(doc, len(read.body) if read is not None else None)
    return b"p:" + prefix if prefix is not None else None


class RoutingPlan:
    """What one request may try, and what it has tried."""

    __slots__ = (
        "route",
        "targets",
        "retry_on",
        "max_attempts",
        "attempt_timeout",
        "tried",
        "key_failures",
        "_last_key",
        "_order",
        "_index",
        "_affinity",
        "_affinity_source",
        "n",
    )

    def __init__(
        self,
        route: Route | None,
        targets: list[Target],
        affinity_source: Callable[[], bytes | None],
    ) -> None:
        self.route = route
        self.targets = targets
        if route is None:
            self.retry_on: frozenset[str] = frozenset()
            self.max_attempts = PLAIN_MAX_ATTEMPTS
            self.attempt_timeout: float | None = None
        else:
            self.retry_on = route.retry_on
            self.max_attempts = route.max_attempts
            self.attempt_timeout = route.attempt_timeout
        #: (target index, key id) of every attempt: a target never uses a key twice
        self.tried: set[tuple[int, str]] = set()
        #: keys their provider refused or rate-limited: no other target uses them either
        self.key_failures: set[str] = set()
        self._last_key: str | None = None
        self._order: list[Target] | None = None
        self._index = 0
        self._affinity: bytes | None = None
        self._affinity_source: Callable[[], bytes | None] | None = affinity_source
        self.n = 0

    @property
    def route_name(self) -> str | None:
        return self.route.name if self.route is not None else None

    def affinity(self) -> bytes | None:
        """What makes this request part of a conversation (computed once, and
        only when a choice depends on it)."""
        source = self._affinity_source
        if source is not None:
            self._affinity_source = None
            self._affinity = source()
        return self._affinity

    def first(self, selector: Selector, org_id: str) -> Attempt | None:
        self._order = selector.order_targets(self, org_id)
        self._index = 0
        return self._from(selector, org_id, self._index, first=True)

    def next(
        self, selector: Selector, org_id: str, status: int | None, failure: str
    ) -> Attempt | None:
        """The attempt after one that failed. ``failure`` is the retry class
        (``"429"``, ``"5xx"``, ``"timeout"``, ``"connect"``, ``"refused"``)
        and ``status`` the provider's status when it answered."""
        if self.n >= self.max_attempts or self._order is None:
            return None
        if failure in ("refused", "429"):
            self.key_failures.add(self._last_key)
            attempt = self._attempt(selector, org_id, self._index, first=False)
            if attempt is not None:
                return attempt  # the next key of the same pool
            if failure == "429" and "429" not in self.retry_on:
                return None
            if failure == "refused" and self.route is None:
                return None
        elif failure not in self.retry_on:
            return None
        return self._from(selector, org_id, self._index + 1, first=True)

    def not_sent(self) -> None:
        """The last attempt never reached its provider (its key does not
        decrypt on this node): it does not count against ``max_attempts``,
        and the next attempt takes its number. Bounded: :meth:`next` then
        sets the key aside as a key failure (as after a refusal), so each key
        of the plan's pools is skipped at most once."""
        self.n -= 1

    def another_key(self, selector: Selector, org_id: str) -> Attempt | None:
        """The attempt after a key failure when the same target's pool has
        another key to try; None, with nothing changed, when it has none
        (the explain API: it walks a pool's keys before the next target)."""
        if self.n >= self.max_attempts or self._order is None:
            return None
        failures = self.key_failures
        self.key_failures = failures | {self._last_key}
        attempt = self._attempt(selector, org_id, self._index, first=False)
        if attempt is None:
            self.key_failures = failures
        return attempt

    def _from(self, selector: Selector, org_id: str, start: int, first: bool) -> Attempt | None:
        for i in range(start, len(self._order)):
            attempt = self._attempt(selector, org_id, i, first)
            if attempt is not None:
                self._index = i
                return attempt
        return None

    def _attempt(self, selector: Selector, org_id: str, index: int, first: bool):
        target = self._order[index]
        tried = self.key_failures
        if self.tried:
            tried = tried | {key for i, key in self.tried if i == index}
        key = selector.pick_key(self, org_id, target, first, tried)
        if key is None:
            return None
        provider = selector.registry.get(target.provider)
        if provider is None:  # a custom provider deleted since the plan was made
            return None
        self.tried.add((index, key.id))
        self._last_key = key.id
        self.n += 1
        return Attempt(self.n, target, provider, key)


def failure_class(status: int) -> str | None:
    """The retry class of a provider's answer, or None when it is final."""
    if status in _KEY_FAILURES:
        return _KEY_FAILURES[status]
    if status >= 500:
        return "5xx"
    return None
