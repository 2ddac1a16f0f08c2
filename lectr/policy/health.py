"""Key cool-downs: a key the provider refused (401/403) or rate-limited
(429) is set aside for a while, and the next key of its pool is tried.

State is per process, in memory, and read on every request: a dict miss is
the common case. A cool-down is a preference, not a ban: when every key of a
pool is cooling down, the keys are still tried (the one whose cool-down ends
first, first), so a wrong guess never becomes an outage made by Lectr.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from lectr.metrics import Registry

#: seconds a key refused by its provider (401/403) is set aside
REFUSED_COOLDOWN = 300.0
#: seconds a rate-limited key is set aside when the provider gave no retry-after
RATE_LIMITED_COOLDOWN = 30.0
#: the longest cool-down a retry-after can ask for
MAX_COOLDOWN = 3600.0
#: how much more than its length a cool-down may have left before the clock
#: is taken for stepped back (see _ended): until - now may exceed the length
#: by a rounding, and a step back shorter than this does no harm
_SLACK = 1.0


@dataclass(frozen=True, slots=True)
class Cooldown:
    until: float  # reactor seconds
    reason: str  # "refused (401)", "rate limited (429)"
    at: float  # wall-clock epoch seconds when it started (for the admin API)
    seconds: float


class KeyHealth:
    def __init__(self, clock, *, wall_clock=None, metrics: Registry | None = None) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._cooling: dict[str, Cooldown] = {}
        #: when the cool-down that ends last ends (reactor seconds), and the
        #: most it may have left (its length and _SLACK): see cooling()
        self._latest = 0.0
        self._latest_left = 0.0
        registry = metrics or Registry()
        self._m_cooldowns = registry.counter(
            "lectr_provider_key_cooldowns_total",
            "Provider keys set aside after a refusal or a rate limit, by provider and reason",
            ["provider", "reason"],
        )
        registry.callback_gauge(
            "lectr_provider_keys_cooling",
            "Provider keys currently cooling down (with --workers: the most any worker has; "
            "each learns from its own answers)",
            lambda: sum(1 for k in list(self._cooling) if self.cooldown(k) is not None),
            mode="livemax",
        )

    def cool(self, key_id: str, provider: str, status: int, retry_after: float | None) -> float:
        """Set a key aside after ``status``; returns the seconds chosen."""
        if status == 429:
            seconds = RATE_LIMITED_COOLDOWN if retry_after is None else retry_after
            reason = "rate_limited"
        else:
            seconds = REFUSED_COOLDOWN
            reason = "refused"
        seconds = max(0.0, min(seconds, MAX_COOLDOWN))
        now = self._clock.seconds()
        self._m_cooldowns.inc(1, provider, reason)
        current = self._cooling.get(key_id)
        if current is not None and _ended(current, now):
            current = None
        if current is not None and current.until >= now + seconds:
            # a later, shorter answer (concurrent requests on one key; a 429
            # with no retry-after after one that asked for an hour, after a
            # refusal's 5 minutes) never ends what an earlier one asked for
            return current.until - now
        wall = self._wall() if self._wall is not None else now
        self._cooling[key_id] = Cooldown(now + seconds, f"{reason} ({status})", wall, seconds)
        if now + seconds > self._latest:
            self._latest = now + seconds
            self._latest_left = seconds + _SLACK
        return seconds

    def cooling(self) -> bool:
        """Whether any key is cooling down now (a cheap test, made before
        looking at each key: every cool-down ends by the latest's end)."""
        if not self._cooling:
            return False
        left = self._latest - self._clock.seconds()
        if left <= 0:
            return False
        if left <= self._latest_left:
            return True
        return self._stepped_back(self._clock.seconds())

    def _stepped_back(self, now: float) -> bool:
        """The latest cool-down has more left than its length: the wall
        clock was stepped back since, and :func:`_ended` has ended it (and
        every other one begun before the step). Taken as the latest still,
        it kept :meth:`cooling` True for as long as the step (every
        multi-target request then scanning the pools for keys that are not
        cooling). The ended cool-downs are forgotten and the latest is taken
        again from the others (once per step: none of them has ended).
        Whether any key is still cooling down."""
        cooling = self._cooling
        for key_id in [k for k, c in cooling.items() if _ended(c, now)]:
            del cooling[key_id]
        latest = max(cooling.values(), key=lambda c: c.until, default=None)
        self._latest = latest.until if latest is not None else 0.0
        self._latest_left = latest.seconds + _SLACK if latest is not None else 0.0
        return latest is not None

    def healthy(self, key_id: str) -> bool:
        if not self._cooling:
            return True
        c = self._cooling.get(key_id)
        if c is None:
            return True
        if _ended(c, self._clock.seconds()):
            del self._cooling[key_id]
            return True
        return False

    def cooldown(self, key_id: str) -> Cooldown | None:
        c = self._cooling.get(key_id)
        if c is not None and _ended(c, self._clock.seconds()):
            del self._cooling[key_id]
            return None
        return c

    def remaining(self, key_id: str) -> float:
        c = self.cooldown(key_id)
        return 0.0 if c is None else c.until - self._clock.seconds()


def _ended(c: Cooldown, now: float) -> bool:
    """Whether a cool-down is over at ``now`` (reactor seconds, i.e. the wall
    clock): past its end, or with more of it left than it was set for - the
    clock has been stepped back since (NTP, a resumed VM), and without this
    a key would stay set aside for as long as the step (a pool of one key
    answering 503 for an hour). It then ends early rather than late: a
    cool-down is a preference, and the provider says again if it must."""
    left = c.until - now
    return left <= 0 or left > c.seconds + _SLACK


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds the provider asks to wait, from its answer's headers:
    ``retry-after-ms`` (OpenAI's, milliseconds) first, else ``retry-after``
    as delta-seconds or an HTTP date (``now``: the wall clock, seconds since
    the epoch). None when absent or malformed (NaN, negative, not a number
    or a date)."""
    ms = _number(headers.first(b"retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    value = headers.first(b"retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.decode("ascii").strip())
    except (UnicodeDecodeError, TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # (an HTTP date is GMT)
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


#: delay-seconds (RFC 9110: digits; a decimal part is tolerated, as providers send one) -
#: not the rest of what float() takes ("1_000", "1e3", "+5", "inf")
_DELAY = re.compile(rb"[0-9]{1,12}(?:\.[0-9]{1,9})?")


def _number(value: bytes | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if _DELAY.fullmatch(value) is None:
        return None
    return float(value)
