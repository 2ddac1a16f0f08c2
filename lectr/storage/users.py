"""SQL for ``user_identities``: the people who use the admin API.

A row is keyed by the OIDC subject (``auth0_user_id``, named after Auth0 but
holding any issuer's ``sub``). ``is_admin`` is never taken from a token: it
is granted by another global admin (``PUT /admin/users/{id}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lectr.db.database import Database, Transaction

_COLUMNS = (
    "id, auth0_user_id, email, email_verified, is_admin, created_at, updated_at, last_seen_at"
)

#: ``last_seen_at`` is refreshed at most this often, so that a dashboard
#: polling the API does not rewrite the row on every call.
SEEN_RESOLUTION = "1 minute"


@dataclass(frozen=True, slots=True)
class User:
    id: str
    subject: str  # the token's ``sub`` (column ``auth0_user_id``)
    email: str | None
    email_verified: bool  # the token that supplied ``email`` said email_verified: true
    is_admin: bool
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None


def _user(row: tuple) -> User:
    return User(*row)


class UserStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record_seen(
        self, subject: str, email: str | None, *, email_verified: bool = False
    ) -> User:
        """Upsert the identity behind a verified token: create it on first
        sight, keep its email and the email's verified flag current (a token
        without an email keeps the stored pair), and refresh
        ``last_seen_at``. The row is only written when something changed or
        the last sighting is older than ``SEEN_RESOLUTION``."""

        async def txn(t: Transaction) -> User:
            row = await t.fetchone(
                f"INSERT INTO user_identities (auth0_user_id, email, email_verified, last_seen_at) "
                f"VALUES (%(subject)s, %(email)s, %(verified)s, now()) "
                f"ON CONFLICT (auth0_user_id) DO UPDATE "
                f"SET email = coalesce(EXCLUDED.email, user_identities.email), "
                f"email_verified = CASE WHEN EXCLUDED.email IS NULL "
                f"THEN user_identities.email_verified ELSE EXCLUDED.email_verified END, "
                f"last_seen_at = now() "
                f"WHERE user_identities.email IS DISTINCT FROM "
                f"coalesce(EXCLUDED.email, user_identities.email) "
                f"OR (EXCLUDED.email IS NOT NULL "
                f"AND user_identities.email_verified <> EXCLUDED.email_verified) "
                f"OR user_identities.last_seen_at IS NULL "
                f"OR user_identities.last_seen_at < now() - interval '{SEEN_RESOLUTION}' "
                f"RETURNING {_COLUMNS}",
                {"subject": subject, "email": email, "verified": bool(email and email_verified)},
            )
            if row is None:  # nothing to change: the conflict's WHERE was false
                row = await t.fetchone(
                    f"SELECT {_COLUMNS} FROM user_identities WHERE auth0_user_id = %s",
                    (subject,),
                )
            return _user(row)

        return await self._db.runInteraction("record_user_seen", txn)

    async def ensure(self, subject: str) -> User:
        """The identity with this subject, created (never seen yet) if
        missing: lets an owner add a member before their first sign-in."""

        async def txn(t: Transaction) -> User:
            await t.execute(
                "INSERT INTO user_identities (auth0_user_id) VALUES (%s) "
                "ON CONFLICT (auth0_user_id) DO NOTHING",
                (subject,),
            )
            row = await t.fetchone(
                f"SELECT {_COLUMNS} FROM user_identities WHERE auth0_user_id = %s", (subject,)
            )
            return _user(row)

        return await self._db.runInteraction("ensure_user", txn)

    async def get(self, user_id: str) -> User | None:
        rows = await self._db.runQuery(
            "get_user", f"SELECT {_COLUMNS} FROM user_identities WHERE id = %s", (user_id,)
        )
        return _user(rows[0]) if rows else None

    async def find_by_email(self, email: str) -> list[User]:
        """Identities whose email matches, case-insensitively, verified ones
        first (at most 2: enough to tell "one verified", "several verified",
        "only unverified" and "none" apart)."""
        rows = await self._db.runQuery(
            "find_users_by_email",
            f"SELECT {_COLUMNS} FROM user_identities WHERE lower(email) = lower(%s) "
            f"ORDER BY email_verified DESC, created_at, id LIMIT 2",
            (email,),
        )
        return [_user(r) for r in rows]

    async def list(self) -> list[User]:
        """Every identity, oldest first (as every org is listed: no page
        silently cut at some count)."""
        rows = await self._db.runQuery(
            "list_users", f"SELECT {_COLUMNS} FROM user_identities ORDER BY created_at, id"
        )
        return [_user(r) for r in rows]

    async def set_admin(self, user_id: str, is_admin: bool) -> User | None:
        async def txn(t: Transaction) -> User | None:
            row = await t.fetchone(
                f"UPDATE user_identities SET is_admin = %s WHERE id = %s RETURNING {_COLUMNS}",
                (is_admin, user_id),
            )
            return _user(row) if row else None

        return await self._db.runInteraction("set_user_admin", txn)
