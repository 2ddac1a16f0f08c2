"""SQL for ``api_keys`` (Lectr keys, stored as SHA-256 hex only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction

_COLUMNS = "id, org_id, name, prefix, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    org_id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key about to be stored: its name, hash and display prefix."""

    name: str
    key_hash: str
    prefix: str

    def __repr__(self) -> str:  # the hash is as good as an id for lookups; keep it out of logs
        return f"NewKey(name={self.name!r}, prefix={self.prefix!r})"


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What authentication needs to know about a presented key."""

    key_id: str
    org_id: str
    org_enabled: bool


def _key(row: tuple) -> ApiKey:
    return ApiKey(*row)


async def insert_key_txn(t: Transaction, org_id: str, new: NewKey) -> ApiKey:
    row = await t.fetchone(
        f"INSERT INTO api_keys (org_id, name, key_hash, prefix) VALUES (%s, %s, %s, %s) "
        f"RETURNING {_COLUMNS}",
        (org_id, new.name, new.key_hash, new.prefix),
    )
    key = _key(row)
    t.notify("key", key.id)
    return key


class ApiKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, org_id: str, new: NewKey) -> ApiKey | None:
        """None when the org does not exist."""

        async def txn(t: Transaction) -> ApiKey | None:
            exists = await t.fetchone(
                "SELECT 1 FROM organizations WHERE id = %s FOR KEY SHARE", (org_id,)
            )
            if exists is None:
                return None
            return await insert_key_txn(t, org_id, new)

        return await self._db.runInteraction("create_key", txn)

    async def list(self, org_id: str) -> list[ApiKey]:
        rows = await self._db.runQuery(
            "list_keys",
            f"SELECT {_COLUMNS} FROM api_keys WHERE org_id = %s ORDER BY created_at, id",
            (org_id,),
        )
        return [_key(r) for r in rows]

    async def get(self, org_id: str, key_id: str) -> ApiKey | None:
        rows = await self._db.runQuery(
            "get_key",
            f"SELECT {_COLUMNS} FROM api_keys WHERE org_id = %s AND id = %s",
            (org_id, key_id),
        )
        return _key(rows[0]) if rows else None

    async def revoke(self, org_id: str, key_id: str) -> ApiKey | None:
        """Revoke one key (idempotent). None when it does not exist."""

        async def txn(t: Transaction) -> ApiKey | None:
            row = await t.fetchone(
                f"UPDATE api_keys SET revoked_at = now() "
                f"WHERE org_id = %s AND id = %s AND revoked_at IS NULL RETURNING {_COLUMNS}",
                (org_id, key_id),
            )
            if row is not None:
                # announced only when it changed something: every node's key
                # cache drops the key, and forgets the hashes it found unknown
                t.notify("key", key_id)
                return _key(row)
            row = await t.fetchone(
                f"SELECT {_COLUMNS} FROM api_keys WHERE org_id = %s AND id = %s",
                (org_id, key_id),
            )
            return _key(row) if row else None  # (revoked already, or no such key)

        return await self._db.runInteraction("revoke_key", txn)

    async def rotate(self, org_id: str, new: NewKey) -> tuple[ApiKey, list[str]] | None:
        """Revoke every active key of the org and issue ``new``, atomically.
        Returns the new key and the ids revoked; None when the org does not
        exist."""

        async def txn(t: Transaction) -> tuple[ApiKey, list[str]] | None:
            exists = await t.fetchone(
                "SELECT 1 FROM organizations WHERE id = %s FOR UPDATE", (org_id,)
            )
            if exists is None:
                return None
            revoked = await t.fetchall(
                "UPDATE api_keys SET revoked_at = now() "
                "WHERE org_id = %s AND revoked_at IS NULL RETURNING id",
                (org_id,),
            )
            key = await insert_key_txn(t, org_id, new)
            for (key_id,) in revoked:
                t.notify("key", key_id)
            t.notify("org", org_id)
            return key, [r[0] for r in revoked]

        return await self._db.runInteraction("rotate_keys", txn)

    async def lookup(self, key_hash: str) -> KeyIdentity | None:
        """The active key with this hash and its org's state; None when no
        active key has it."""
        rows = await self._db.runQuery(
            "lookup_key",
            "SELECT k.id, k.org_id, o.enabled FROM api_keys k "
            "JOIN organizations o ON o.id = k.org_id "
            "WHERE k.key_hash = %s AND k.revoked_at IS NULL",
            (key_hash,),
        )
        return KeyIdentity(*rows[0]) if rows else None

    async def lookup_many(self, key_hashes: list[str]) -> dict[str, KeyIdentity]:
        """hash -> identity for those of ``key_hashes`` that are active keys."""
        rows = await self._db.runQuery(
            "lookup_keys",
            "SELECT k.key_hash, k.id, k.org_id, o.enabled FROM api_keys k "
            "JOIN organizations o ON o.id = k.org_id "
            "WHERE k.key_hash = ANY(%s) AND k.revoked_at IS NULL",
            (key_hashes,),
        )
        return {r[0]: KeyIdentity(r[1], r[2], r[3]) for r in rows}

    async def all_active(self) -> list[tuple[str, KeyIdentity]]:
        """(hash, identity) of every active key: for warming a cache. The
        hashes stay inside the process."""
        rows = await self._db.runQuery(
            "all_active_keys",
            "SELECT k.key_hash, k.id, k.org_id, o.enabled FROM api_keys k "
            "JOIN organizations o ON o.id = k.org_id WHERE k.revoked_at IS NULL",
        )
        return [(r[0], KeyIdentity(r[1], r[2], r[3])) for r in rows]
