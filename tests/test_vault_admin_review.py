"""Third review of the vault and the admin API's storage: defects found and
their regression tests.

1. Once a rotation had nothing left to rewrap (done, or stalled), its job
   checked again only once a minute and stopped probing the census
   meanwhile: after 31 s (the census ttl) every peer was forgotten, so a
   node without ENCRYPTION_KEY_NEW that had started since (an empty vault
   accepts any key) no longer counted, and keys added through the rotating
   node were sealed with the new key, which that node could not open.
2. Associated data length-prefixed each field with 2 bytes: a value of
   64 KiB or more written into a ``provider_keys`` row raised OverflowError
   (start-up, the proxy's path, every rewrap batch) instead of failing
   authentication. Longer fields now have their own prefix; shorter ones
   encode as before.
3. A development ``admin.token`` left empty by an older version was served
   as the token "": nobody could sign in, and nothing said why.
4. POST and PUT /admin/providers answered from the registry after its
   reload: a delete committed in between (or a late reload) made a stored
   provider a 500 (KeyError).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.vault.crypto import Binding, kek_fingerprint
from tests.support.fake_provider import OPENAI_KEY
from tests.test_vault import fake as vault_fake
from tests.test_vault import new_kek, sql, wait_for
from tests.test_vault import orgs as vault_orgs
from tests.test_vault import vaults as vault_vaults
from tests.test_vault_review import FAST_CENSUS

fake, vaults, orgs = vault_fake, vault_vaults, vault_orgs


# --- 1. an idle rotation keeps its census current ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_node_that_starts_after_the_rotation_went_idle_still_counts(vaults, orgs):
    old, new = new_kek(), new_kek()
    org, _ = await orgs.create_org("Idle")
    rotating = await vaults.start(
        old, new, listener=await vaults.listener(), rewrap_interval=0.01, **FAST_CENSUS
    )
    await wait_for(lambda: rotating._rewrapper.done)  # (an empty vault: nothing to rewrap)
    laggard = await vaults.start(old, listener=await vaults.listener())
    await wait_for(lambda: laggard._census.node_id in rotating._census.peers)
    # well past the census ttl (1 s here), well within the idle minute
    await deferLater(reactor, 2.5, lambda: None)
    await rotating.add_key(org.id, "openai", OPENAI_KEY)
    await wait_for(lambda: laggard.pool(org.id, "openai"))
    secret = laggard.provider_key(org.id, "openai")
    assert secret is not None and secret.reveal() == OPENAI_KEY


# --- 2. an oversized value in a row fails like any other change ----------------------------


@pytest.mark.parametrize("column", ["base_url", "api_version", "provider"])
@pytest_twisted.ensureDeferred
async def test_an_oversized_value_written_into_a_row_only_disables_that_row(
    vaults, orgs, fake, db_url, column
):
    """Associated data length-prefixed every field with 2 bytes: a value of
    64 KiB or more written into ``provider_keys`` (the database writer the
    binding of options guards against) raised OverflowError instead of
    failing authentication: at start-up (the sample of each master key's
    rows), on the proxy's path, and in every rewrap batch, so that no row
    of the batch it fell in, nor of any later one, was ever rewrapped."""
    old, new = new_kek(), new_kek()
    victim, _ = await orgs.create_org("Victim")
    other, _ = await orgs.create_org("Other")
    vault = await vaults.start(old)
    await vault.add_key(other.id, "openai", OPENAI_KEY)
    info = await vault.add_key(victim.id, "openai", OPENAI_KEY)  # the newest row
    await vault.stop()
    sql(db_url, f"UPDATE provider_keys SET {column} = repeat('a', 70000) WHERE id = %s", (info.id,))

    # start-up: the other row shows the master key is right
    plain = await vaults.start(old)
    assert plain.provider_key(other.id, "openai").reveal() == OPENAI_KEY
    if column != "provider":
        assert plain.provider_key(victim.id, "openai") is None  # skipped, not raised
    await plain.stop()

    # a rotation moves every row but the damaged one, then says it stalled
    rotating = await vaults.start(old, new, rewrap_interval=0.01)
    moved = kek_fingerprint(new.reveal())

    def kek_of(key_id: str) -> str:
        return sql(db_url, "SELECT kek_id FROM provider_keys WHERE id <> %s", (key_id,))[0][0]

    await wait_for(lambda: kek_of(info.id) == moved, timeout=10)
    await wait_for(lambda: info.id in rotating._rewrapper._skip)


def _old_field(raw: bytes) -> bytes:  # the encoding every stored row was sealed with
    return len(raw).to_bytes(2, "big") + raw


_lengths = st.one_of(st.integers(0, 40), st.sampled_from([0xFFFE, 0xFFFF, 0x10000, 0x10001, 70000]))
_texts = st.builds(lambda n, c: c * n, _lengths, st.sampled_from(["a", "é", "\x00"]))
_options = st.one_of(st.none(), _texts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=st.tuples(_texts, _texts, _options, _options),
    b=st.tuples(_texts, _texts, _options, _options),
)
def test_associated_data_is_injective_whatever_the_lengths(a, b):
    """Any field of any length encodes (no OverflowError), two different
    bindings never share associated data, and a field shorter than 65,535
    bytes encodes exactly as before (every stored row still opens)."""
    record = "5f0c8f1e-0000-4000-8000-000000000000"

    def binding(t):
        return Binding(t[0], t[1], record, t[2], t[3])

    ba, bb = binding(a), binding(b)
    assert (ba.key_ad() == bb.key_ad()) == (a[:2] == b[:2])
    assert (ba.dek_ad() == bb.dek_ad()) == (a == b)
    if all(len(x.encode()) < 0xFFFF for x in a if x is not None):
        parts = (b"lectr/wrapped-dek/v2", a[0].encode(), a[1].encode(), record.encode())
        opts = b"".join(b"\x00" if o is None else b"\x01" + _old_field(o.encode()) for o in a[2:])
        assert ba.dek_ad() == b"".join(_old_field(p) for p in parts) + opts


# --- 3. an unusable development admin token is refused, not served -------------------------


@pytest.mark.parametrize("content", ["", "\n", "short\n", "two words here, long enough\n"])
def test_an_unusable_development_admin_token_file_is_a_clear_error(tmp_path, content):
    """An ``admin.token`` left empty (by an interrupted first run of a version
    that wrote it in place: the atomic write only stops new ones) was read
    as the token "": Lectr started, announced "admin token in …", and then
    refused every admin call, the CLI and the dashboard alike. The file's
    token is now checked as LECTR_ADMIN_TOKEN is."""
    import io

    from lectr.config import ConfigError, load_config
    from lectr.devmode import apply_development_defaults

    data = tmp_path / "d"
    data.mkdir()
    (data / "admin.token").write_text(content)
    config = load_config({"data_dir": str(data)}, {})
    with pytest.raises(ConfigError) as caught:
        apply_development_defaults(config, io.StringIO())
    message = str(caught.value)
    assert str(data / "admin.token") in message and "delete it" in message
    assert content.strip() == "" or content.strip() not in message
    # deleted, it is generated again
    (data / "admin.token").unlink()
    again = apply_development_defaults(config, io.StringIO())
    assert len(again.admin_token.reveal()) >= 16


# --- 4. a custom provider stored is answered as stored -------------------------------------


@pytest_twisted.async_yield_fixture
async def admin_env(db_url, tmp_path):
    from tests.support.admin import start_admin_env

    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest_twisted.ensureDeferred
async def test_a_custom_provider_deleted_right_after_it_is_stored_is_not_a_500(
    admin_env, db_url, method
):
    """POST and PUT /admin/providers answered with the provider as the
    node's registry held it after the reload: when a DELETE (from another
    admin, on any node) committed between the write and that reload, or the
    reload was late, the name was missing and the stored provider was
    answered 500 (KeyError). The answer now describes the row written."""
    from lectr.storage.custom_providers import CustomProviderStore

    class DeletedRightAfter(CustomProviderStore):
        async def upsert(self, *args, **kw):
            result = await super().upsert(*args, **kw)
            sql(db_url, "DELETE FROM custom_providers WHERE name = %s", (args[0],))
            return result

    manager = admin_env.components.custom_providers
    manager._store = DeletedRightAfter(admin_env.components.database)
    body = {"name": "vllm", "dialect": "openai", "base_url": "http://10.0.0.1:8000"}
    if method == "POST":
        answer = await admin_env.admin.post("/admin/providers", body)
    else:
        del body["name"]
        answer = await admin_env.admin.put("/admin/providers/vllm", body)
    assert answer.status == 201, answer.json
    assert (answer.json["name"], answer.json["base_url"], answer.json["custom"]) == (
        "vllm",
        "http://10.0.0.1:8000",
        True,
    )
