"""SQL for ``org_provider_settings`` (per org and provider: enabled, allowed
and blocked model patterns). Writes send ``settings:<org id>``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction

NOTIFY_KIND = "settings"

_COLUMNS = "org_id, provider, enabled, allowed_models, blocked_models, updated_at"


@dataclass(frozen=True, slots=True)
class ProviderSettingsRow:
    org_id: str
    provider: str
    enabled: bool
    allowed_models: tuple[str, ...]
    blocked_models: tuple[str, ...]
    updated_at: datetime


def _row(r: tuple) -> ProviderSettingsRow:
    org_id, provider, enabled, allowed, blocked, updated_at = r
    return ProviderSettingsRow(
        org_id, provider, enabled, tuple(allowed or ()), tuple(blocked or ()), updated_at
    )


class ProviderSettingsStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def org_exists(self, org_id: str) -> bool:
        rows = await self._db.runQuery(
            "provider_settings_org_exists", "SELECT 1 FROM organizations WHERE id = %s", (org_id,)
        )
        return bool(rows)

    async def load(self, org_ids: list[str] | None = None) -> list[ProviderSettingsRow]:
        """Every row (of ``org_ids`` when given)."""
        if org_ids is None:
            rows = await self._db.runQuery(
                "load_provider_settings", f"SELECT {_COLUMNS} FROM org_provider_settings"
            )
        else:
            rows = await self._db.runQuery(
                "load_org_provider_settings",
                f"SELECT {_COLUMNS} FROM org_provider_settings WHERE org_id = ANY(%s::uuid[])",
                (list(org_ids),),
            )
        return [_row(r) for r in rows]

    async def upsert(
        self,
        org_id: str,
        provider: str,
        *,
        enabled: bool | None,
        allowed_models: list[str] | None,
        blocked_models: list[str] | None,
    ) -> ProviderSettingsRow | None:
        """Set the given fields (None: keep the stored value, or the default
        for a new row). None when the org does not exist."""

        async def txn(t: Transaction) -> ProviderSettingsRow | None:
            exists = await t.fetchone(
                "SELECT 1 FROM organizations WHERE id = %s FOR KEY SHARE", (org_id,)
            )
            if exists is None:
                return None
            row = await t.fetchone(
                "INSERT INTO org_provider_settings "
                "(org_id, provider, enabled, allowed_models, blocked_models) "
                "VALUES (%(org)s, %(provider)s, coalesce(%(enabled)s, true), "
                "coalesce(%(allowed)s::text[], '{}'::text[]), "
                "coalesce(%(blocked)s::text[], '{}'::text[])) "
                "ON CONFLICT (org_id, provider) DO UPDATE SET "
                "enabled = coalesce(%(enabled)s, org_provider_settings.enabled), "
                "allowed_models = coalesce(%(allowed)s::text[], "
                "org_provider_settings.allowed_models), "
                "blocked_models = coalesce(%(blocked)s::text[], "
                "org_provider_settings.blocked_models) "
                f"RETURNING {_COLUMNS}",
                {
                    "org": org_id,
                    "provider": provider,
                    "enabled": enabled,
                    "allowed": allowed_models,
                    "blocked": blocked_models,
                },
            )
            t.notify(NOTIFY_KIND, org_id)
            return _row(row)

        return await self._db.runInteraction("upsert_provider_settings", txn)
