"""SQL for ``provider_keys`` (BYOK keys, envelope-encrypted by the vault).

This module only moves sealed bytes; encryption happens in
:mod:`lectr.vault.crypto`, called by :class:`lectr.managers.vault.VaultManager`.
Every write sends ``provider_key:<org id>`` in its transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction
from lectr.storage.custom_providers import ProviderGone

NOTIFY_KIND = "provider_key"

_META = "id, org_id, provider, name, last4, enabled, created_at, weight, base_url, api_version"
_SEALED = _META + ", ciphertext, nonce, wrapped_dek, dek_nonce, kek_id"
# Newest first: the key in use is the first enabled one of its org and provider.
_NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"


@dataclass(frozen=True, slots=True)
class ProviderKeyRecord:
    """A row without its crypto columns (for listings)."""

    id: str
    org_id: str
    provider: str
    name: str
    last4: str
    enabled: bool
    created_at: datetime
    weight: int = 1
    base_url: str | None = None
    api_version: str | None = None


@dataclass(frozen=True, slots=True)
class SealedProviderKey:
    """A whole row: metadata and the sealed key."""

    id: str
    org_id: str
    provider: str
    name: str
    last4: str
    enabled: bool
    created_at: datetime
    weight: int
    base_url: str | None
    api_version: str | None
    ciphertext: bytes
    nonce: bytes
    wrapped_dek: bytes
    dek_nonce: bytes
    kek_id: str

    def __repr__(self) -> str:
        return (
            f"SealedProviderKey(id={self.id!r}, org_id={self.org_id!r}, "
            f"provider={self.provider!r}, kek_id={self.kek_id!r})"
        )


@dataclass(frozen=True, slots=True)
class NewProviderKey:
    """A row about to be inserted (the manager picked the id and sealed the
    key with it in the associated data)."""

    id: str
    org_id: str
    provider: str
    name: str
    last4: str
    ciphertext: bytes
    nonce: bytes
    wrapped_dek: bytes
    dek_nonce: bytes
    kek_id: str
    weight: int = 1
    base_url: str | None = None
    api_version: str | None = None

    def __repr__(self) -> str:
        return f"NewProviderKey(id={self.id!r}, org_id={self.org_id!r}, provider={self.provider!r})"


@dataclass(frozen=True, slots=True)
class Rewrapped:
    """A new wrapping of one row's DEK (ciphertext and nonce unchanged)."""

    id: str
    wrapped_dek: bytes
    dek_nonce: bytes
    kek_id: str


def _sealed(row: tuple) -> SealedProviderKey:
    *meta, ct, nonce, wdek, dnonce, kek = row
    return SealedProviderKey(*meta, bytes(ct), bytes(nonce), bytes(wdek), bytes(dnonce), kek)


class ProviderKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def org_exists(self, org_id: str) -> bool:
        rows = await self._db.runQuery(
            "provider_keys_org_exists", "SELECT 1 FROM organizations WHERE id = %s", (org_id,)
        )
        return bool(rows)

    async def insert(
        self, new: NewProviderKey, *, custom: bool = False
    ) -> ProviderKeyRecord | None:
        """None when the org does not exist (any more). ``custom``: the key
        is for a custom provider, whose row is held while the key is stored
        (a delete of the provider waits, then sees the key); ProviderGone
        when it was deleted meanwhile."""

        async def txn(t: Transaction) -> ProviderKeyRecord | None:
            exists = await t.fetchone(
                "SELECT 1 FROM organizations WHERE id = %s FOR KEY SHARE", (new.org_id,)
            )
            if exists is None:
                return None
            if custom and (
                await t.fetchone(
                    "SELECT 1 FROM custom_providers WHERE name = %s FOR KEY SHARE",
                    (new.provider,),
                )
                is None
            ):
                raise ProviderGone(new.provider)
            row = await t.fetchone(
                "INSERT INTO provider_keys (id, org_id, provider, name, last4, ciphertext, nonce, "
                "wrapped_dek, dek_nonce, kek_id, weight, base_url, api_version) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {_META}",
                (
                    new.id,
                    new.org_id,
                    new.provider,
                    new.name,
                    new.last4,
                    new.ciphertext,
                    new.nonce,
                    new.wrapped_dek,
                    new.dek_nonce,
                    new.kek_id,
                    new.weight,
                    new.base_url,
                    new.api_version,
                ),
            )
            t.notify(NOTIFY_KIND, new.org_id)
            return ProviderKeyRecord(*row)

        return await self._db.runInteraction("insert_provider_key", txn)

    async def list(self, org_id: str) -> list[ProviderKeyRecord]:
        rows = await self._db.runQuery(
            "list_provider_keys",
            f"SELECT {_META} FROM provider_keys WHERE org_id = %s ORDER BY provider, "
            "created_at DESC, id DESC",
            (org_id,),
        )
        return [ProviderKeyRecord(*r) for r in rows]

    async def delete(self, org_id: str, key_id: str) -> bool:
        async def txn(t: Transaction) -> bool:
            deleted = await t.execute(
                "DELETE FROM provider_keys WHERE org_id = %s AND id = %s", (org_id, key_id)
            )
            if deleted:
                t.notify(NOTIFY_KIND, org_id)
            return bool(deleted)

        return await self._db.runInteraction("delete_provider_key", txn)

    async def update(
        self,
        org_id: str,
        key_id: str,
        *,
        enabled: bool | None = None,
        weight: int | None = None,
        name: str | None = None,
    ) -> ProviderKeyRecord | None:
        """Change the given fields of one key (None: keep)."""

        async def txn(t: Transaction) -> ProviderKeyRecord | None:
            row = await t.fetchone(
                "UPDATE provider_keys SET enabled = coalesce(%s, enabled), "
                "weight = coalesce(%s, weight), name = coalesce(%s, name) "
                f"WHERE org_id = %s AND id = %s RETURNING {_META}",
                (enabled, weight, name, org_id, key_id),
            )
            if row is not None:
                t.notify(NOTIFY_KIND, org_id)
            return ProviderKeyRecord(*row) if row else None

        return await self._db.runInteraction("update_provider_key", txn)

    async def count_by_provider(self, provider: str) -> int:
        rows = await self._db.runQuery(
            "count_provider_keys_of_provider",
            "SELECT count(*) FROM provider_keys WHERE provider = %s",
            (provider,),
        )
        return int(rows[0][0])

    # --- the vault's cache -----------------------------------------------------

    async def load_enabled(self, org_ids: list[str] | None = None) -> list[SealedProviderKey]:
        """Every enabled row (of ``org_ids`` when given), newest first."""
        if org_ids is None:
            rows = await self._db.runQuery(
                "load_provider_keys",
                f"SELECT {_SEALED} FROM provider_keys WHERE enabled {_NEWEST_FIRST}",
            )
        else:
            rows = await self._db.runQuery(
                "load_org_provider_keys",
                f"SELECT {_SEALED} FROM provider_keys "
                f"WHERE enabled AND org_id = ANY(%s::uuid[]) {_NEWEST_FIRST}",
                (list(org_ids),),
            )
        return [_sealed(r) for r in rows]

    async def sample(self, kek_id: str, limit: int) -> list[SealedProviderKey]:
        """A few rows wrapped by ``kek_id`` (enabled or not)."""
        rows = await self._db.runQuery(
            "sample_provider_keys",
            f"SELECT {_SEALED} FROM provider_keys WHERE kek_id = %s {_NEWEST_FIRST} LIMIT %s",
            (kek_id, limit),
        )
        return [_sealed(r) for r in rows]

    # --- rotation ----------------------------------------------------------------

    async def announce(self, kind: str, ident: str) -> None:
        """Send one notification (the vault census: ids and fingerprints)."""

        def txn(t: Transaction) -> None:
            t.notify(kind, ident)

        await self._db.runInteraction("vault_census", txn)

    async def count_by_kek(self) -> dict[str, int]:
        rows = await self._db.runQuery(
            "count_provider_keys_by_kek",
            "SELECT kek_id, count(*) FROM provider_keys GROUP BY kek_id",
        )
        return {kek_id: int(n) for kek_id, n in rows}

    async def rewrap_batch(
        self,
        from_keks: list[str],
        limit: int,
        rewrap: Callable[[SealedProviderKey], Rewrapped | None],
        skip_ids: list[str] = (),
    ) -> list[tuple[str, str]]:
        """Rewrap up to ``limit`` rows wrapped by one of ``from_keks``.

        The rows are locked with ``SKIP LOCKED``, so several processes can
        share the work without waiting on each other; ``rewrap(row)`` returns
        the new wrapping, or None to leave a row alone. Each UPDATE also
        requires the row to still have the KEK it was read with, so a batch
        is idempotent. Returns (id, org id) of the rows rewrapped; their orgs
        are notified in the same transaction."""

        async def txn(t: Transaction) -> list[tuple[str, str]]:
            rows = await t.fetchall(
                f"SELECT {_SEALED} FROM provider_keys "
                "WHERE kek_id = ANY(%s) AND NOT (id = ANY(%s::uuid[])) "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                (list(from_keks), list(skip_ids), limit),
            )
            sealed = [_sealed(r) for r in rows]
            updates = []
            for row in sealed:
                new = rewrap(row)
                if new is not None:
                    updates.append((row, new))
            if not updates:
                return []
            done = await t.fetchall(
                "UPDATE provider_keys AS p SET wrapped_dek = u.wrapped_dek, "
                "dek_nonce = u.dek_nonce, kek_id = u.kek_id "
                "FROM unnest(%s::uuid[], %s::bytea[], %s::bytea[], %s::text[], %s::text[]) "
                "AS u(id, wrapped_dek, dek_nonce, kek_id, old_kek_id) "
                "WHERE p.id = u.id AND p.kek_id = u.old_kek_id "
                "RETURNING p.id, p.org_id",
                (
                    [new.id for _, new in updates],
                    [new.wrapped_dek for _, new in updates],
                    [new.dek_nonce for _, new in updates],
                    [new.kek_id for _, new in updates],
                    [row.kek_id for row, _ in updates],
                ),
            )
            for org_id in sorted({org_id for _, org_id in done}):
                t.notify(NOTIFY_KIND, org_id)
            return [(id_, org_id) for id_, org_id in done]

        return await self._db.runInteraction("rewrap_provider_keys", txn)
