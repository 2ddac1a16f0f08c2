"""Organizations and Lectr keys through the manager, on a real database."""

from __future__ import annotations

import hashlib
import select
import time

import psycopg2
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.errors import BadRequest, Conflict, NotFound
from lectr.managers.orgs import OrgManager, hash_key, looks_like_key
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore


@pytest.fixture
def orgs(database) -> OrgManager:
    return OrgManager(OrgStore(database), ApiKeyStore(database))


class Notifications:
    """A plain psycopg2 listener on lectr_changes."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("LISTEN lectr_changes")

    def drain(self, expect: int = 0, timeout: float = 2.0) -> list[str]:
        """What has arrived; with ``expect``, wait (up to ``timeout``) until
        at least that many have."""
        deadline = time.monotonic() + timeout
        while True:
            self.conn.poll()
            if len(self.conn.notifies) >= expect or time.monotonic() > deadline:
                break
            select.select([self.conn], [], [], 0.05)
        out = [n.payload for n in self.conn.notifies]
        del self.conn.notifies[:]
        return out

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def notifications(db_url):
    n = Notifications(db_url)
    yield n
    n.close()


def stored_hashes(url: str) -> list[tuple[str, str]]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT key_hash, prefix FROM api_keys")
            return cur.fetchall()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_create_org_issues_a_key_shown_once_and_stored_as_hash(orgs, db_url):
    org, issued = await orgs.create_org("  Acme  ")
    assert org.name == "Acme" and org.enabled
    plaintext = issued.plaintext.reveal()
    assert looks_like_key(plaintext)
    assert repr(issued.plaintext) == "<redacted>" and plaintext not in repr(issued)
    assert issued.key.prefix == plaintext[:11]
    [(key_hash, prefix)] = stored_hashes(db_url)
    assert key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert prefix == plaintext[:11]
    # the plaintext is nowhere in the database
    conn = psycopg2.connect(db_url)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM api_keys WHERE key_hash = %s OR prefix = %s OR name = %s",
            (plaintext, plaintext, plaintext),
        )
        assert cur.fetchone() == (0,)
    conn.close()


@pytest_twisted.ensureDeferred
async def test_lookup_by_hash(orgs, database):
    org, issued = await orgs.create_org("Acme")
    store = ApiKeyStore(database)
    ident = await store.lookup(hash_key(issued.plaintext.reveal()))
    assert (ident.key_id, ident.org_id, ident.org_enabled) == (issued.key.id, org.id, True)
    assert await store.lookup(hash_key("lc_00000000-0000-4000-8000-000000000000")) is None


@pytest_twisted.ensureDeferred
async def test_org_crud(orgs):
    a, _ = await orgs.create_org("A")
    b, _ = await orgs.create_org("B")
    assert [o.name for o in await orgs.list_orgs()] == ["A", "B"]
    assert [o.name for o in await orgs.list_orgs([b.id])] == ["B"]
    renamed = await orgs.rename_org(a.id, "A2")
    assert renamed.name == "A2" and renamed.updated_at >= a.updated_at
    assert (await orgs.get_org(a.id)).name == "A2"
    await orgs.delete_org(a.id)
    with pytest.raises(NotFound):
        await orgs.get_org(a.id)
    with pytest.raises(NotFound):
        await orgs.delete_org(a.id)


@pytest_twisted.ensureDeferred
async def test_malformed_ids_are_not_found_without_reaching_sql(orgs):
    for bad in ("nope", "1; DROP TABLE organizations", "", None, 42):
        with pytest.raises(NotFound):
            await orgs.get_org(bad)
    with pytest.raises(NotFound):
        await orgs.revoke_key("00000000-0000-4000-8000-000000000000", "x")


@pytest_twisted.ensureDeferred
async def test_names_are_validated(orgs):
    for bad in ("", "   ", "a" * 201, "tab\tname", 5, None):
        with pytest.raises(BadRequest):
            await orgs.create_org(bad)


@pytest_twisted.ensureDeferred
async def test_kill_switch_and_notifications(orgs, database, notifications):
    org, issued = await orgs.create_org("Acme")
    created = notifications.drain(expect=2)
    assert set(created) == {f"org:{org.id}", f"key:{issued.key.id}"}
    off = await orgs.set_enabled(org.id, False)
    assert off.enabled is False
    ident = await ApiKeyStore(database).lookup(hash_key(issued.plaintext.reveal()))
    assert ident.org_enabled is False
    assert notifications.drain(expect=1) == [f"org:{org.id}"]
    assert (await orgs.set_enabled(org.id, True)).enabled is True
    assert notifications.drain(expect=1) == [f"org:{org.id}"]


@pytest_twisted.ensureDeferred
async def test_keys_create_list_revoke(orgs, database, notifications):
    org, first = await orgs.create_org("Acme")
    second = await orgs.create_key(org.id, "ci")
    keys = await orgs.list_keys(org.id)
    assert [(k.name, k.active) for k in keys] == [("default", True), ("ci", True)]
    assert len(notifications.drain(expect=3)) == 3  # org + first key, then the second key
    revoked = await orgs.revoke_key(org.id, second.key.id)
    assert revoked.revoked_at is not None
    assert notifications.drain(expect=1) == [f"key:{second.key.id}"]
    store = ApiKeyStore(database)
    assert await store.lookup(hash_key(second.plaintext.reveal())) is None
    assert await store.lookup(hash_key(first.plaintext.reveal())) is not None
    # revoking again is idempotent and keeps the first revocation time
    again = await orgs.revoke_key(org.id, second.key.id)
    assert again.revoked_at == revoked.revoked_at
    # a key of another org is not found through this org
    other, _ = await orgs.create_org("Other")
    with pytest.raises(NotFound):
        await orgs.revoke_key(other.id, first.key.id)


@pytest_twisted.ensureDeferred
async def test_rotate_revokes_all_and_issues_one(orgs, database, notifications):
    org, first = await orgs.create_org("Acme")
    second = await orgs.create_key(org.id, "ci")
    assert len(notifications.drain(expect=3)) == 3
    new = await orgs.rotate_keys(org.id)
    store = ApiKeyStore(database)
    assert await store.lookup(hash_key(first.plaintext.reveal())) is None
    assert await store.lookup(hash_key(second.plaintext.reveal())) is None
    assert (await store.lookup(hash_key(new.plaintext.reveal()))).org_id == org.id
    sent = notifications.drain(expect=4)
    assert {f"key:{first.key.id}", f"key:{second.key.id}", f"org:{org.id}"} <= set(sent)
    active = [k for k in await orgs.list_keys(org.id) if k.active]
    assert [k.id for k in active] == [new.key.id]
    with pytest.raises(NotFound):
        await orgs.rotate_keys("00000000-0000-4000-8000-000000000000")


@pytest_twisted.ensureDeferred
async def test_delete_org_removes_its_keys(orgs, database):
    org, issued = await orgs.create_org("Acme")
    await orgs.delete_org(org.id)
    assert await ApiKeyStore(database).lookup(hash_key(issued.plaintext.reveal())) is None


def test_key_format_check():
    assert looks_like_key("lc_0b5c3a51-1c1e-4a7b-9a52-5f2a8e8c0d11")
    for bad in (
        "lc_0B5C3A51-1C1E-4A7B-9A52-5F2A8E8C0D11",
        "sk-abc",
        "lc_",
        "",
        "lc_0b5c3a51-1c1e-1a7b-9a52-5f2a8e8c0d11",
        "lc_0b5c3a51-1c1e-4a7b-9a52-5f2a8e8c0d11x",
    ):
        assert not looks_like_key(bad)


# --- names are unique per deployment, whatever their case ---------------------------


def _flip(c: str) -> str:
    """The other case of ``c`` when that is a plain one-to-one swap (not
    "ß" → "SS" or "İ" → "i̇")."""
    other = c.swapcase()
    return other if len(other) == 1 and other.swapcase() == c else c


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(
        st.characters(
            min_codepoint=0x21, max_codepoint=0x4FF, categories=("Lu", "Ll", "Nd", "Po", "Pd")
        ),
        min_size=1,
        max_size=40,
    ),
    flips=st.lists(st.booleans(), min_size=40, max_size=40),
    pad=st.sampled_from(["", " ", "  "]),
)
@pytest_twisted.ensureDeferred
async def test_a_name_in_any_case_is_taken_once(orgs, name, flips, pad):
    variant = pad + "".join(_flip(c) if f else c for c, f in zip(name, flips, strict=False)) + pad
    try:
        first, _ = await orgs.create_org(name)
    except Conflict:
        return  # an earlier example took this name (or a case variant of it) already
    with pytest.raises(Conflict) as taken:
        await orgs.create_org(variant)
    assert taken.value.code == "name_taken" and taken.value.status == 409
    second, _ = await orgs.create_org(name + " 2")
    with pytest.raises(Conflict):
        await orgs.rename_org(second.id, variant)
    assert (await orgs.rename_org(first.id, variant)).name == variant.strip()
