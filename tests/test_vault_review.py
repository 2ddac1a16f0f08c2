"""Review of the vault: defects found and their regression tests.

1. A key's own options (``base_url``, ``api_version``) were not bound to its
   sealed form: someone with write access to the database could point any
   stored key at a host of their choosing (``UPDATE provider_keys SET
   base_url = 'https://evil'``) and Lectr would decrypt it and send it there.
   They are now bound into the wrapped DEK's associated data; rows sealed
   before that (``wrapped-dek/v1``) still open where that is no worse than
   what an org admin could have chosen (no base URL, or one of the
   provider's own hosts), and a rotation rebinds them.
2. Development secrets (``<data-dir>/encryption.key``, ``admin.token``) were
   written into the file their exclusive creation had just made, unsynced: a
   first run stopped in between, or a power loss, left an empty file that
   every later start read, and a second process starting at the same time
   could read it empty too. They are now written whole to a temporary file,
   synced, and linked into place.
3. During a rolling restart (step 2 of a rotation), a node with
   ENCRYPTION_KEY_NEW sealed keys added through it with the new key while the
   census said a running node lacked it: that node could not open them.
4. Mid-rotation, a mistyped ENCRYPTION_KEY_NEW was reported as a wrong
   ENCRYPTION_KEY (the one key that was right).
"""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lectr.providers import ProviderRegistry
from lectr.providers.catalogue.anthropic import Anthropic
from lectr.providers.catalogue.azure import Azure
from lectr.providers.catalogue.openai import OpenAI
from lectr.storage.provider_keys import NewProviderKey, ProviderKeyStore
from lectr.util.secret import Secret
from lectr.vault.crypto import Binding, Keyring, Prepared, Sealed
from lectr.vault.errors import DecryptionFailed
from tests.support.fake_provider import OPENAI_KEY
from tests.test_vault import fake as vault_fake
from tests.test_vault import kek as vault_kek
from tests.test_vault import new_kek, sql, wait_for
from tests.test_vault import orgs as vault_orgs
from tests.test_vault import vaults as vault_vaults

KEY = b"sk-test-review-0123456789abcdefghijklmnop"

# --- fixtures and helpers -----------------------------------------------------------------


# (test_vault's fixtures: a fake provider, a vault factory, orgs, a master key)
fake, vaults, orgs, kek = vault_fake, vault_vaults, vault_orgs, vault_kek


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def legacy_seal(raw_kek: bytes, org_id: str, provider: str, record_id: str, plaintext: bytes):
    """A row as Lectr sealed it before options were bound (wrapped-dek/v1):
    written by hand, so the test does not depend on the code under test."""
    dek = os.urandom(32)
    nonce, dek_nonce = os.urandom(12), os.urandom(12)
    ids = (org_id.encode(), provider.encode(), record_id.encode())
    ciphertext = AESGCM(dek).encrypt(nonce, plaintext, _lp(b"lectr/provider-key/v1", *ids))
    wrapped = AESGCM(raw_kek).encrypt(dek_nonce, dek, _lp(b"lectr/wrapped-dek/v1", *ids))
    ring = Keyring(Secret(raw_kek))
    return Sealed(ciphertext, nonce, wrapped, dek_nonce, ring.current.fingerprint)


def opens(ring: Keyring, binding: Binding, sealed: Sealed) -> bool:
    try:
        ring.open(binding, sealed)
    except DecryptionFailed:
        return False
    try:
        ring.open_prepared(Prepared(binding, sealed))
    except DecryptionFailed:
        raise AssertionError("open and open_prepared disagree") from None
    return True


urls = st.one_of(
    st.none(),
    st.builds(
        lambda host, path: f"https://{host}.example{path}",
        st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
        st.sampled_from(["", "/openai", "/v1/x"]),
    ),
)
versions = st.one_of(st.none(), st.sampled_from(["2024-10-21", "2025-01-01-preview", "v1"]))


# --- 1. a key's options are bound --------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(url=urls, version=versions, other_url=urls, other_version=versions)
def test_a_key_opens_only_with_the_options_it_was_stored_with(
    url, version, other_url, other_version
):
    ring = Keyring(Secret(os.urandom(32)))
    org, record = str(uuid.uuid4()), str(uuid.uuid4())
    sealed = ring.seal(Binding(org, "azure", record, url, version), KEY)
    assert opens(ring, Binding(org, "azure", record, url, version), sealed)
    moved = Binding(org, "azure", record, other_url, other_version)
    assert opens(ring, moved, sealed) == ((other_url, other_version) == (url, version))
    # a rewrapped key stays bound to them
    rewrapped = ring.rewrap(Binding(org, "azure", record, url, version), sealed)
    assert opens(ring, moved, rewrapped) == ((other_url, other_version) == (url, version))


def test_a_none_option_and_an_empty_one_are_not_the_same_binding():
    ring = Keyring(Secret(os.urandom(32)))
    org, record = str(uuid.uuid4()), str(uuid.uuid4())
    sealed = ring.seal(Binding(org, "openai", record, None, None), KEY)
    assert not opens(ring, Binding(org, "openai", record, "", None), sealed)
    assert not opens(ring, Binding(org, "openai", record, None, ""), sealed)


@settings(max_examples=50)
@given(url=urls, version=versions)
def test_a_legacy_row_opens_only_where_the_vault_allows_it(url, version):
    raw = os.urandom(32)
    ring = Keyring(Secret(raw))
    org, record = str(uuid.uuid4()), str(uuid.uuid4())
    sealed = legacy_seal(raw, org, "openai", record, KEY)
    assert opens(ring, Binding(org, "openai", record, url, version, legacy=True), sealed)
    assert not opens(ring, Binding(org, "openai", record, url, version), sealed)
    # a rotation rebinds it: the new wrapping carries the options it was read with
    rewrapped = ring.rewrap(Binding(org, "openai", record, url, version, legacy=True), sealed)
    assert opens(ring, Binding(org, "openai", record, url, version), rewrapped)
    other_url, other_version = (url or "https://x") + "/y", (version or "") + "-x"
    assert not opens(ring, Binding(org, "openai", record, other_url, version, True), rewrapped)
    assert not opens(ring, Binding(org, "openai", record, url, other_version, True), rewrapped)


@pytest_twisted.ensureDeferred
async def test_a_key_pointed_at_another_host_in_the_database_does_not_decrypt(
    vaults, orgs, kek, db_url
):
    org, _ = await orgs.create_org("Acme")
    other, _ = await orgs.create_org("Other")
    writer = await vaults.start(kek)
    info = await writer.add_key(org.id, "openai", OPENAI_KEY)
    await writer.add_key(other.id, "openai", OPENAI_KEY)  # untouched
    # an attacker with write access to the database redirects the key
    sql(
        db_url,
        "UPDATE provider_keys SET base_url = 'https://attacker.example' WHERE id = %s",
        (info.id,),
    )
    reader = await vaults.start(kek)
    [key] = reader.pool(org.id, "openai")
    assert key.base_url == "https://attacker.example"  # what the proxy would call
    assert reader.reveal(key) is None  # ...so it must not get the key
    assert reader.provider_key(other.id, "openai").reveal() == OPENAI_KEY
    # the untouched row still opens
    sql(db_url, "UPDATE provider_keys SET base_url = NULL WHERE id = %s", (info.id,))
    again = await vaults.start(kek)
    assert again.provider_key(org.id, "openai").reveal() == OPENAI_KEY


async def _insert_legacy(database, raw: bytes, org_id: str, provider: str, plaintext: str, url):
    record = str(uuid.uuid4())
    s = legacy_seal(raw, org_id, provider, record, plaintext.encode())
    await ProviderKeyStore(database).insert(
        NewProviderKey(
            record,
            org_id,
            provider,
            "legacy",
            plaintext[-4:],
            s.ciphertext,
            s.nonce,
            s.wrapped_dek,
            s.dek_nonce,
            s.kek_id,
            base_url=url,
        )
    )
    return record


@pytest.mark.parametrize(
    ("provider", "url", "usable"),
    [
        ("openai", None, True),
        ("openai", "https://attacker.example", False),
        ("azure", "https://acme.openai.azure.com", True),
        ("azure", "https://attacker.example", False),
        ("azure", "http://acme.openai.azure.com", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_legacy_rows_open_only_with_options_an_admin_could_have_given(
    vaults, orgs, kek, database, fake, provider, url, usable
):
    org, _ = await orgs.create_org("Legacy")
    plaintext = f"sk-legacy-{uuid.uuid4().hex}"
    await _insert_legacy(database, kek.reveal(), org.id, provider, plaintext, url)
    registry = ProviderRegistry(
        [OpenAI(fake.openai_base_url), Anthropic(fake.anthropic_base_url), Azure()]
    )
    vault = await vaults.start(kek, registry=registry)
    secret = vault.provider_key(org.id, provider)
    assert (secret is not None and secret.reveal() == plaintext) is usable


@pytest_twisted.ensureDeferred
async def test_a_rotation_rebinds_legacy_rows(vaults, orgs, kek, database, db_url):
    org, _ = await orgs.create_org("Rotating")
    plaintext = f"sk-legacy-{uuid.uuid4().hex}"
    record = await _insert_legacy(database, kek.reveal(), org.id, "openai", plaintext, None)
    other, _ = await orgs.create_org("Untouched")
    await _insert_legacy(database, kek.reveal(), other.id, "openai", plaintext, None)
    new = new_kek()
    rotating = await vaults.start(kek, new, rewrap_interval=0.01)
    target = rotating._keyring.next.fingerprint
    await wait_for(lambda: rotating._rewrapper.done, timeout=20)
    [(kek_id,)] = sql(db_url, "SELECT kek_id FROM provider_keys WHERE id = %s", (record,))
    assert kek_id == target
    after = await vaults.start(new)
    assert after.provider_key(org.id, "openai").reveal() == plaintext
    # and the rebound row no longer follows a redirect
    sql(db_url, "UPDATE provider_keys SET base_url = 'https://x.example' WHERE id = %s", (record,))
    redirected = await vaults.start(new)
    assert redirected.provider_key(org.id, "openai") is None
    assert redirected.provider_key(other.id, "openai").reveal() == plaintext


# --- 2. development secrets are written whole, or not at all ------------------------------


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("name", ["encryption.key", "admin.token"])
def test_a_development_secret_is_never_left_empty_by_an_interrupted_first_run(tmp_path, name):
    """The secret used to be written into the file its exclusive creation
    made: a process stopped in between (or a power loss before the data
    reached the disk) left an empty file, and every later start read ""
    (a master key that protects nothing any more, or no admin token)."""
    from lectr.devmode import _read_or_create

    path = tmp_path / name

    def interrupted():
        raise _Interrupted()

    with pytest.raises(_Interrupted):
        _read_or_create(path, interrupted)
    value, created = _read_or_create(path, lambda: "the-value")
    assert (value, created) == ("the-value", True)
    assert path.read_text() == "the-value\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing left behind
    assert _read_or_create(path, interrupted) == ("the-value", False)


def test_concurrent_first_runs_agree_on_one_development_secret(tmp_path):
    """Two processes creating the secret at once: the loser never reads a
    file the winner has created but not written yet."""
    import threading

    from lectr.devmode import _read_or_create

    path = tmp_path / "encryption.key"
    started = threading.Event()
    release = threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return "winner"

    results: list = []
    t = threading.Thread(target=lambda: results.append(_read_or_create(path, slow)))
    t.start()
    assert started.wait(5)
    try:
        # the winner is between deciding to create and writing
        loser = _read_or_create(path, lambda: "loser")
    finally:
        release.set()
        t.join(5)
    assert {loser[0], results[0][0]} == {path.read_text().strip()}
    assert [loser[1], results[0][1]].count(True) == 1


# --- 3. during a rolling restart, new keys stay readable by every node --------------------

FAST_CENSUS = {"census_interval": 0.2, "census_wait": 0.1, "census_ttl": 1.0}


@pytest_twisted.ensureDeferred
async def test_a_key_added_during_a_rolling_restart_opens_on_every_node(vaults, orgs, db_url, fake):
    """A node with ENCRYPTION_KEY_NEW used to seal a key added through it with
    the new key at once, even while the census said another running node
    lacked that key: that node then could not open it (502s there until its
    restart), though the rotation's whole design is that no node ever meets a
    key it cannot open. New keys are now sealed with the new key only once
    every running node holds it; until then with the old one, which the
    rotation rewraps like every other row."""
    from lectr.vault.crypto import kek_fingerprint

    old, new = new_kek(), new_kek()
    org, _ = await orgs.create_org("Rolling")
    laggard = await vaults.start(old, listener=await vaults.listener())
    rotating = await vaults.start(
        old, new, listener=await vaults.listener(), rewrap_interval=0.01, **FAST_CENSUS
    )
    await wait_for(lambda: rotating._rewrapper._blocked)  # the census sees the laggard
    info = await rotating.add_key(org.id, "openai", OPENAI_KEY)
    await wait_for(lambda: laggard.pool(org.id, "openai"))
    secret = laggard.provider_key(org.id, "openai")
    assert secret is not None and secret.reveal() == OPENAI_KEY
    assert rotating.provider_key(org.id, "openai").reveal() == OPENAI_KEY

    # the laggard restarts with both keys: the rotation moves the key too
    await laggard.stop()
    upgraded = await vaults.start(old, new, listener=await vaults.listener(), **FAST_CENSUS)

    def kek_of(key_id: str) -> str:
        return sql(db_url, "SELECT kek_id FROM provider_keys WHERE id = %s", (key_id,))[0][0]

    await wait_for(lambda: kek_of(info.id) == kek_fingerprint(new.reveal()), timeout=30)
    await wait_for(lambda: rotating._rewrapper.done)
    # once every node holds the new key, new keys are sealed with it directly
    fake.resource.keys["openai"].add("sk-test-openai-third-key-00001234")
    later = await rotating.add_key(org.id, "openai", "sk-test-openai-third-key-00001234")
    assert kek_of(later.id) == kek_fingerprint(new.reveal())
    await wait_for(lambda: len(upgraded.pool(org.id, "openai")) == 2)
    assert upgraded.provider_key(org.id, "openai").reveal() == "sk-test-openai-third-key-00001234"


# --- 4. a wrong ENCRYPTION_KEY_NEW is named as such -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wrong_new_key_mid_rotation_is_blamed_on_encryption_key_new(
    vaults, orgs, database, db_url
):
    """Mid-rotation (rows under both keys), a node restarted with the right
    ENCRYPTION_KEY and a mistyped ENCRYPTION_KEY_NEW was told
    "ENCRYPTION_KEY does not match ... set ENCRYPTION_KEY to the master key
    they were stored with": the one key that was right."""
    from lectr.vault.errors import VaultKeyError

    old, new = new_kek(), new_kek()
    for name in ("a", "b"):
        org, _ = await orgs.create_org(name)
        await _insert_legacy(
            database, old.reveal(), org.id, "openai", f"sk-{uuid.uuid4().hex}", None
        )
    rotating = await vaults.start(old, new, rewrap_batch_size=1, rewrap_interval=60)
    await wait_for(lambda: rotating._rewrapper._rewrapped_total == 1)
    await rotating.stop()
    counts = dict(sql(db_url, "SELECT kek_id, count(*) FROM provider_keys GROUP BY kek_id"))
    assert sorted(counts.values()) == [1, 1]  # one row under each key

    with pytest.raises(VaultKeyError) as caught:
        await vaults.start(old, new_kek())  # a typo in ENCRYPTION_KEY_NEW
    message = str(caught.value)
    assert "ENCRYPTION_KEY_NEW does not match" in message
    assert "set ENCRYPTION_KEY to" not in message
