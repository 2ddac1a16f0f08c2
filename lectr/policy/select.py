"""Choosing among weighted candidates (keys of a pool, targets of a
weighted route).

- Without a conversation to stick to: smooth weighted round-robin (nginx's
  algorithm), per pool and per process. Over any window of ``sum(weights)``
  picks each candidate is chosen exactly ``weight`` times, so the spread is
  exact rather than statistically close.
- With one (a session key, or a digest of a cacheable prompt prefix):
  weighted rendezvous hashing. Every (conversation, candidate) pair gets a
  score ``-ln(u) / weight`` with ``u`` a uniform hash in (0, 1); the lowest
  score wins. A conversation keeps its candidate while that candidate is
  healthy; taking a candidate out moves only the conversations it held
  (each to its own next-best candidate), and over many conversations each
  candidate holds a share proportional to its weight.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

_SCALE = float(1 << 64)


def rendezvous_score(affinity: bytes, candidate_id: str, weight: int) -> float:
    digest = hashlib.blake2b(affinity + b"\x00" + candidate_id.encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1)
    return -math.log(u) / weight


def rendezvous_order(
    affinity: bytes, candidates: Sequence[T], ident: Callable[[T], str], weight: Callable[[T], int]
) -> list[T]:
    """Candidates from best to worst for this conversation."""
    return sorted(candidates, key=lambda c: rendezvous_score(affinity, ident(c), weight(c)))


class RoundRobin:
    """Smooth weighted round-robin state, one per pool key (e.g. (org,
    provider)). Bounded: pools that no longer exist are forgotten when the
    table grows past ``max_pools``."""

    def __init__(self, max_pools: int = 100_000, parent: RoundRobin | None = None) -> None:
        self._state: dict[Hashable, dict[str, int]] = {}
        self._max = max_pools
        self._parent = parent

    def fork(self) -> RoundRobin:
        """A round-robin that starts from this one's state and never changes
        it (each pool's state is copied when the fork first uses it): what
        the explain API needs to name the picks this one would make next."""
        return RoundRobin(self._max, parent=self)

    def pick(
        self,
        pool: Hashable,
        candidates: Sequence[T],
        ident: Callable[[T], str],
        weight: Callable[[T], int],
    ) -> T:
        if len(candidates) == 1:
            return candidates[0]
        state = self._state.get(pool)
        if state is None:
            if len(self._state) >= self._max:
                self._state.clear()
            parent = self._parent
            base = parent._state.get(pool) if parent is not None else None
            state = self._state[pool] = {} if base is None else dict(base)
        total = 0
        best = None
        best_value = 0
        for c in candidates:
            cid = ident(c)
            w = weight(c)
            total += w
            value = state.get(cid, 0) + w
            state[cid] = value
            if best is None or value > best_value:
                best, best_value = c, value
        state[ident(best)] = best_value - total
        return best
