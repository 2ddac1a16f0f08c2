"""SQL for limits and budgets: the caps (``limits``), the cluster-wide
counters nodes draw leases from (``limit_counters``), concurrency slots
(``limit_slots``), node heartbeats (``limit_nodes``) and budget-alert claims
(``limit_alerts``). Writes to ``limits`` send ``limits:<org id>``.

Amounts are integers: requests, tokens, micro-dollars (USD × 10⁶).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from lectr.db.database import Database, Transaction

NOTIFY_KIND = "limits"
FIELDS = ("rpm", "tpm", "max_concurrent", "usd_per_day", "usd_per_month")
_COLUMNS = (
    "scope_id, org_id, key_id, rpm, tpm, max_concurrent, usd_per_day, usd_per_month, updated_at"
)
# pg_advisory_xact_lock(class, key): the class of concurrency-slot locks
_SLOT_LOCK_CLASS = 0x4C494D  # "LIM"


@dataclass(frozen=True, slots=True)
class LimitsRow:
    scope_id: str
    org_id: str
    key_id: str | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    usd_per_day: Decimal | None
    usd_per_month: Decimal | None
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class Draw:
    """One counter's part of a lease round: record ``debt`` (consumption
    beyond what the node held; negative: unused allowance given back), draw
    up to ``want`` more without passing ``cap``, add ``spent`` to the
    reported consumption."""

    scope_id: str
    org_id: str
    metric: str
    window_start: datetime
    debt: int
    want: int
    cap: int
    spent: int


@dataclass(frozen=True, slots=True)
class Drawn:
    scope_id: str
    metric: str
    window_start: datetime
    used: int  # allocated across the cluster (leases + debts), after this draw
    spent: int  # consumption reported by every node
    grant: int  # what this draw granted


@dataclass(frozen=True, slots=True)
class SlotRequest:
    """Hold ``want`` concurrency slots of ``scope_id`` (at least ``in_use``,
    at most what the other nodes leave of ``cap``)."""

    scope_id: str
    org_id: str
    in_use: int
    want: int
    cap: int


@dataclass(frozen=True, slots=True)
class SlotsHeld:
    scope_id: str
    held: int
    others: int  # slots the other live nodes hold


@dataclass(frozen=True, slots=True)
class AlertClaim:
    scope_id: str
    org_id: str
    budget: str  # usd_per_day | usd_per_month
    window_start: datetime
    threshold: int  # percent


def _row(r: tuple) -> LimitsRow:
    return LimitsRow(*r)


def _lock_key(scope_id: str) -> int:
    return zlib.crc32(scope_id.encode()) - 2**31


class LimitStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- the caps ---------------------------------------------------------------

    async def load(self, org_ids: list[str] | None = None) -> list[LimitsRow]:
        """Every row (of ``org_ids`` when given)."""
        if org_ids is None:
            rows = await self._db.runQuery("load_limits", f"SELECT {_COLUMNS} FROM limits")
        else:
            rows = await self._db.runQuery(
                "load_org_limits",
                f"SELECT {_COLUMNS} FROM limits WHERE org_id = ANY(%s::uuid[])",
                (list(org_ids),),
            )
        return [_row(r) for r in rows]

    async def scope_exists(self, org_id: str, key_id: str | None) -> bool:
        if key_id is None:
            rows = await self._db.runQuery(
                "limits_org_exists", "SELECT 1 FROM organizations WHERE id = %s", (org_id,)
            )
        else:
            rows = await self._db.runQuery(
                "limits_key_exists",
                "SELECT 1 FROM api_keys WHERE id = %s AND org_id = %s",
                (key_id, org_id),
            )
        return bool(rows)

    async def get(self, scope_id: str) -> LimitsRow | None:
        rows = await self._db.runQuery(
            "get_limits", f"SELECT {_COLUMNS} FROM limits WHERE scope_id = %s", (scope_id,)
        )
        return _row(rows[0]) if rows else None

    async def put(self, org_id: str, key_id: str | None, changes: dict) -> LimitsRow | None:
        """Set the given fields (a None value removes that limit; fields not
        given keep their values). A scope left without any limit loses its
        row. Returns the limits in force (``updated_at`` None once the row
        is gone), or None when the org (or the key in it) does not exist."""
        scope_id = key_id or org_id

        async def txn(t: Transaction) -> LimitsRow | None:
            if key_id is None:
                exists = await t.fetchone(
                    "SELECT 1 FROM organizations WHERE id = %s FOR KEY SHARE", (org_id,)
                )
            else:
                exists = await t.fetchone(
                    "SELECT 1 FROM api_keys WHERE id = %s AND org_id = %s FOR KEY SHARE",
                    (key_id, org_id),
                )
            if exists is None:
                return None
            current = await t.fetchone(
                f"SELECT {_COLUMNS} FROM limits WHERE scope_id = %s FOR UPDATE", (scope_id,)
            )
            values = {f: None for f in FIELDS}
            if current is not None:
                values.update(zip(FIELDS, current[3:8], strict=True))
            values.update(changes)
            t.notify(NOTIFY_KIND, org_id)
            if all(v is None for v in values.values()):
                await t.execute("DELETE FROM limits WHERE scope_id = %s", (scope_id,))
                return LimitsRow(scope_id, org_id, key_id, None, None, None, None, None, None)
            row = await t.fetchone(
                "INSERT INTO limits (scope_id, org_id, key_id, rpm, tpm, max_concurrent, "
                "usd_per_day, usd_per_month) VALUES (%(scope)s, %(org)s, %(key)s, %(rpm)s, "
                "%(tpm)s, %(max_concurrent)s, %(usd_per_day)s, %(usd_per_month)s) "
                "ON CONFLICT (scope_id) DO UPDATE SET rpm = EXCLUDED.rpm, tpm = EXCLUDED.tpm, "
                "max_concurrent = EXCLUDED.max_concurrent, usd_per_day = EXCLUDED.usd_per_day, "
                f"usd_per_month = EXCLUDED.usd_per_month RETURNING {_COLUMNS}",
                {"scope": scope_id, "org": org_id, "key": key_id, **values},
            )
            return _row(row)

        return await self._db.runInteraction("put_limits", txn)

    # --- leases -------------------------------------------------------------------

    async def draw(self, draws: list[Draw], new: list[Draw]) -> list[Drawn]:
        """One lease round for many counters, atomically per counter: record
        each debt, grant ``LEAST(want, cap - used)`` (never below zero), add
        the reported consumption. ``new``: counters this node has not seen
        in the database yet (their rows are created first)."""
        draws = sorted(draws, key=lambda d: (d.scope_id, d.metric, d.window_start))

        async def txn(t: Transaction) -> list[Drawn]:
            if new:
                fresh = sorted(new, key=lambda d: (d.scope_id, d.metric, d.window_start))
                await t.execute(
                    "INSERT INTO limit_counters (scope_id, metric, window_start, org_id) "
                    "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::uuid[]) "
                    "ON CONFLICT DO NOTHING",
                    (
                        [d.scope_id for d in fresh],
                        [d.metric for d in fresh],
                        [d.window_start for d in fresh],
                        [d.org_id for d in fresh],
                    ),
                )
            # SET expressions all read the row as it was: last_grant is the
            # grant, used the allocation after it.
            rows = await t.fetchall(
                "UPDATE limit_counters AS c SET "
                "last_grant = LEAST(d.want, GREATEST(d.cap - c.used - d.debt, 0)), "
                "used = c.used + d.debt + LEAST(d.want, GREATEST(d.cap - c.used - d.debt, 0)), "
                "spent = c.spent + d.spent, updated_at = now() "
                "FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::bigint[], "
                "%s::bigint[], %s::bigint[], %s::bigint[]) "
                "AS d(scope_id, metric, window_start, debt, want, cap, spent) "
                "WHERE c.scope_id = d.scope_id AND c.metric = d.metric "
                "AND c.window_start = d.window_start "
                "RETURNING c.scope_id, c.metric, c.window_start, c.used, c.spent, c.last_grant",
                (
                    [d.scope_id for d in draws],
                    [d.metric for d in draws],
                    [d.window_start for d in draws],
                    [d.debt for d in draws],
                    [d.want for d in draws],
                    [d.cap for d in draws],
                    [d.spent for d in draws],
                ),
            )
            return [Drawn(str(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]

        return await self._db.runInteraction("limits_draw", txn)

    async def hold_slots(
        self, node_id: str, requests: list[SlotRequest], ttl: float
    ) -> list[SlotsHeld]:
        """Set the concurrency slots this node holds, each scope under an
        advisory lock (taken in a fixed order) so that two nodes never both
        take the last free slots; other nodes' expired holdings do not
        count."""
        requests = sorted(requests, key=lambda r: _lock_key(r.scope_id))

        async def txn(t: Transaction) -> list[SlotsHeld]:
            await t.execute(
                "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int[]) AS k",
                (_SLOT_LOCK_CLASS, [_lock_key(r.scope_id) for r in requests]),
            )
            rows = await t.fetchall(
                "WITH d AS (SELECT * FROM unnest(%(scope)s::uuid[], %(org)s::uuid[], "
                "%(in_use)s::int[], %(want)s::int[], %(cap)s::int[]) "
                "AS d(scope_id, org_id, in_use, want, cap)), "
                "o AS (SELECT d.scope_id, (SELECT coalesce(sum(s.held), 0) FROM limit_slots s "
                "WHERE s.scope_id = d.scope_id AND s.node_id <> %(node)s "
                "AND s.expires_at > now())::int AS others FROM d), "
                "up AS (INSERT INTO limit_slots AS s "
                "(scope_id, node_id, org_id, held, in_use, expires_at) "
                "SELECT d.scope_id, %(node)s, d.org_id, "
                "GREATEST(d.in_use, LEAST(d.want, d.cap - o.others)), d.in_use, "
                "now() + make_interval(secs => %(ttl)s) FROM d JOIN o USING (scope_id) "
                "ON CONFLICT (scope_id, node_id) DO UPDATE SET held = EXCLUDED.held, "
                "in_use = EXCLUDED.in_use, expires_at = EXCLUDED.expires_at "
                "RETURNING s.scope_id, s.held) "
                "SELECT up.scope_id, up.held, o.others FROM up JOIN o USING (scope_id)",
                {
                    "scope": [r.scope_id for r in requests],
                    "org": [r.org_id for r in requests],
                    "in_use": [r.in_use for r in requests],
                    "want": [r.want for r in requests],
                    "cap": [r.cap for r in requests],
                    "node": node_id,
                    "ttl": ttl,
                },
            )
            return [SlotsHeld(str(r[0]), r[1], r[2]) for r in rows]

        return await self._db.runInteraction("limits_hold_slots", txn)

    async def heartbeat(self, node_id: str, live_within: float) -> int:
        """Record that this node lives; the number of nodes seen within
        ``live_within`` seconds (this one included)."""

        async def txn(t: Transaction) -> int:
            await t.execute(
                "INSERT INTO limit_nodes (node_id, seen_at) VALUES (%s, now()) "
                "ON CONFLICT (node_id) DO UPDATE SET seen_at = now()",
                (node_id,),
            )
            row = await t.fetchone(
                "SELECT count(*) FROM limit_nodes "
                "WHERE seen_at > now() - make_interval(secs => %s)",
                (live_within,),
            )
            return int(row[0])

        return await self._db.runInteraction("limits_heartbeat", txn)

    async def leave(self, node_id: str) -> None:
        """A node stops: its slots and heartbeat go."""

        async def txn(t: Transaction) -> None:
            await t.execute("DELETE FROM limit_slots WHERE node_id = %s", (node_id,))
            await t.execute("DELETE FROM limit_nodes WHERE node_id = %s", (node_id,))

        await self._db.runInteraction("limits_leave", txn)

    # --- budget alerts --------------------------------------------------------------

    async def claim_alerts(self, claims: list[AlertClaim]) -> list[AlertClaim]:
        """The claims no node made before (each threshold of a budget's
        window is claimed once in the cluster)."""
        if not claims:
            return []
        rows = await self._db.runInteraction(
            "limits_claim_alerts",
            _claim_txn,
            sorted(claims, key=lambda c: (c.scope_id, c.budget, c.window_start, c.threshold)),
        )
        won = {(str(r[0]), r[1], r[2], r[3]) for r in rows}
        return [c for c in claims if (c.scope_id, c.budget, c.window_start, c.threshold) in won]

    # --- read-back and upkeep ----------------------------------------------------------

    async def spent(self, scope_id: str, windows: list[tuple[str, datetime]]) -> dict[str, int]:
        """Reported consumption of a scope's counters: metric -> spent, for
        the given (metric, window start) pairs."""
        rows = await self._db.runQuery(
            "limits_spent",
            "SELECT c.metric, c.spent FROM limit_counters c JOIN unnest(%s::text[], "
            "%s::timestamptz[]) AS w(metric, window_start) USING (metric, window_start) "
            "WHERE c.scope_id = %s",
            ([m for m, _ in windows], [w for _, w in windows], scope_id),
        )
        return {r[0]: r[1] for r in rows}

    async def slots_in_use(self, scope_id: str) -> int:
        rows = await self._db.runQuery(
            "limits_slots_in_use",
            "SELECT coalesce(sum(in_use), 0) FROM limit_slots "
            "WHERE scope_id = %s AND expires_at > now()",
            (scope_id,),
        )
        return int(rows[0][0])

    async def cleanup(self) -> int:
        """Delete what no window needs any more: minute counters after an
        hour, daily ones after 40 days, monthly ones after 400 days; expired
        slots, silent nodes, old alert claims."""

        async def txn(t: Transaction) -> int:
            n = await t.execute(
                "DELETE FROM limit_counters WHERE "
                "(metric IN ('requests', 'tokens') AND window_start < now() - interval '1 hour') "
                "OR (metric = 'usd_day' AND window_start < now() - interval '40 days') "
                "OR window_start < now() - interval '400 days'"
            )
            n += await t.execute(
                "DELETE FROM limit_slots WHERE expires_at < now() - interval '1 hour'"
            )
            n += await t.execute("DELETE FROM limit_nodes WHERE seen_at < now() - interval '1 day'")
            n += await t.execute(
                "DELETE FROM limit_alerts WHERE window_start < now() - interval '400 days'"
            )
            return n

        return await self._db.runInteraction("limits_cleanup", txn)


async def _claim_txn(t: Transaction, claims: list[AlertClaim]) -> list[tuple]:
    return await t.fetchall(
        "INSERT INTO limit_alerts (scope_id, budget, window_start, threshold, org_id) "
        "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::smallint[], "
        "%s::uuid[]) ON CONFLICT DO NOTHING "
        "RETURNING scope_id, budget, window_start, threshold",
        (
            [c.scope_id for c in claims],
            [c.budget for c in claims],
            [c.window_start for c in claims],
            [c.threshold for c in claims],
            [c.org_id for c in claims],
        ),
    )
