"""Organizations and their Lectr keys.

A Lectr key is ``lc_<uuid4>``. Only its SHA-256 (hex) and a short display
prefix are stored; the plaintext is returned once, when the key is made.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from lectr.errors import Conflict, NotFound
from lectr.storage.api_keys import ApiKey, ApiKeyStore, NewKey
from lectr.storage.orgs import NameTaken, Org, OrgStore
from lectr.util.secret import Secret
from lectr.util.validate import clean_name, parse_uuid

KEY_PREFIX = "lc_"
KEY_RE = re.compile(r"lc_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 8


def looks_like_key(candidate: str) -> bool:
    """The format check done before any lookup."""
    return len(candidate) == 39 and KEY_RE.fullmatch(candidate) is not None


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just made: its stored record and the plaintext, shown once."""

    key: ApiKey
    plaintext: Secret[str]


def _new_key(name: str) -> tuple[NewKey, Secret[str]]:
    plaintext = KEY_PREFIX + str(uuid.uuid4())
    return (
        NewKey(name=name, key_hash=hash_key(plaintext), prefix=plaintext[:DISPLAY_PREFIX_LEN]),
        Secret(plaintext),
    )


def _name_taken(name: str) -> Conflict:
    shown = name if len(name) <= 60 else name[:60] + "…"
    return Conflict(
        f"an organization named {shown!r} already exists (names are unique, whatever their "
        "case): choose another name",
        code="name_taken",
    )


class OrgManager:
    def __init__(self, orgs: OrgStore, keys: ApiKeyStore) -> None:
        self._orgs = orgs
        self._keys = keys

    # --- organizations -------------------------------------------------------

    async def create_org(
        self, name: object, key_name: object = "default", *, owner_id: str | None = None
    ) -> tuple[Org, IssuedKey]:
        """Create an org and its first key; ``owner_id`` (a user identity)
        becomes its owner in the same transaction."""
        new, plaintext = _new_key(clean_name(key_name, "key name"))
        name = clean_name(name, "name")
        try:
            org, key = await self._orgs.create(name, new, owner_id)
        except NameTaken:
            raise _name_taken(name) from None
        return org, IssuedKey(key, plaintext)

    async def get_org(self, org_id: object) -> Org:
        org = await self._orgs.get(parse_uuid(org_id, "organization"))
        if org is None:
            raise NotFound("organization not found")
        return org

    async def list_orgs(self, only_ids: list[str] | None = None) -> list[Org]:
        return await self._orgs.list(only_ids)

    async def rename_org(self, org_id: object, name: object) -> Org:
        name = clean_name(name)
        try:
            org = await self._orgs.rename(parse_uuid(org_id, "organization"), name)
        except NameTaken:
            raise _name_taken(name) from None
        if org is None:
            raise NotFound("organization not found")
        return org

    async def set_enabled(self, org_id: object, enabled: bool) -> Org:
        """The kill switch. Every node stops (or resumes) serving the org's
        keys as soon as the change notification arrives."""
        org = await self._orgs.set_enabled(parse_uuid(org_id, "organization"), bool(enabled))
        if org is None:
            raise NotFound("organization not found")
        return org

    async def delete_org(self, org_id: object) -> None:
        if not await self._orgs.delete(parse_uuid(org_id, "organization")):
            raise NotFound("organization not found")

    # --- keys ----------------------------------------------------------------

    async def create_key(self, org_id: object, name: object = "default") -> IssuedKey:
        new, plaintext = _new_key(clean_name(name, "key name"))
        key = await self._keys.create(parse_uuid(org_id, "organization"), new)
        if key is None:
            raise NotFound("organization not found")
        return IssuedKey(key, plaintext)

    async def list_keys(self, org_id: object) -> list[ApiKey]:
        org = await self.get_org(org_id)
        return await self._keys.list(org.id)

    async def revoke_key(self, org_id: object, key_id: object) -> ApiKey:
        key = await self._keys.revoke(parse_uuid(org_id, "organization"), parse_uuid(key_id, "key"))
        if key is None:
            raise NotFound("key not found")
        return key

    async def rotate_keys(self, org_id: object, name: object = "default") -> IssuedKey:
        """Revoke all of the org's keys and issue one new key."""
        new, plaintext = _new_key(clean_name(name, "key name"))
        result = await self._keys.rotate(parse_uuid(org_id, "organization"), new)
        if result is None:
            raise NotFound("organization not found")
        key, _revoked = result
        return IssuedKey(key, plaintext)
