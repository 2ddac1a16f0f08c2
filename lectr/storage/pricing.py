"""SQL for ``price_overrides`` (global admins' prices). Writes send
``pricing:<provider>``; every node then reloads the (small) table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg2.extras import Json

from lectr.db.database import Database, Transaction

NOTIFY_KIND = "pricing"

_COLUMNS = "provider, model, prices, created_at, updated_at"


@dataclass(frozen=True, slots=True)
class PriceOverrideRow:
    provider: str
    model: str
    prices: dict  # rates as decimal strings, long_context, max_output_tokens, checked, note
    created_at: datetime
    updated_at: datetime


class PricingStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def load(self) -> list[PriceOverrideRow]:
        rows = await self._db.runQuery(
            "load_price_overrides", f"SELECT {_COLUMNS} FROM price_overrides"
        )
        return [PriceOverrideRow(*r) for r in rows]

    async def upsert(self, provider: str, model: str, prices: dict) -> PriceOverrideRow:
        async def txn(t: Transaction) -> PriceOverrideRow:
            row = await t.fetchone(
                "INSERT INTO price_overrides (provider, model, prices) VALUES (%s, %s, %s) "
                "ON CONFLICT (provider, model) DO UPDATE SET prices = EXCLUDED.prices "
                f"RETURNING {_COLUMNS}",
                (provider, model, Json(prices)),
            )
            t.notify(NOTIFY_KIND, provider)
            return PriceOverrideRow(*row)

        return await self._db.runInteraction("upsert_price_override", txn)

    async def delete(self, provider: str, model: str) -> bool:
        async def txn(t: Transaction) -> bool:
            n = await t.execute(
                "DELETE FROM price_overrides WHERE provider = %s AND model = %s",
                (provider, model),
            )
            if n:
                t.notify(NOTIFY_KIND, provider)
            return bool(n)

        return await self._db.runInteraction("delete_price_override", txn)
