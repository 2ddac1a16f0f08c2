"""The BYOK vault (VaultManager) on a real PostgreSQL, validating keys with
the fake provider over loopback."""

from __future__ import annotations

import base64
import json
import os
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.db.notify import ChangeListener
from lectr.errors import BadRequest, NotFound, Unprocessable, UpstreamUnavailable
from lectr.managers.orgs import OrgManager
from lectr.managers.vault import ProviderKeyInfo, VaultManager
from lectr.metrics import Registry
from lectr.providers import ProviderRegistry
from lectr.providers.catalogue.anthropic import Anthropic
from lectr.providers.catalogue.openai import OpenAI
from lectr.providers.http import make_http_request
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.storage.provider_keys import ProviderKeyStore
from lectr.util.secret import Secret
from lectr.vault.crypto import kek_fingerprint
from lectr.vault.errors import VaultKeyError
from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY, FakeProviderServer, Script
from tests.support.pg import admin_execute

OPENAI_KEY_2 = "sk-test-openai-second-key-0000WXYZ"


# --- helpers (also used by the other test_vault_* modules) ------------------------


def new_kek() -> Secret[bytes]:
    return Secret(os.urandom(32))


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.01) -> float:
    """Wait until ``predicate()``; return the seconds it took."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, step)
        waited += step
    return waited


def sql(url: str, query: str, args=None) -> list[tuple]:
    return admin_execute(url, query, args)


def registry_for(fake: FakeProviderServer) -> ProviderRegistry:
    return ProviderRegistry([OpenAI(fake.openai_base_url), Anthropic(fake.anthropic_base_url)])


class Vaults:
    """Makes VaultManagers (each a "node" when given its own listener) and
    stops them, and their listeners, at the end of the test."""

    def __init__(self, database, db_url: str, fake: FakeProviderServer) -> None:
        self.database = database
        self.db_url = db_url
        self.fake = fake
        self.registry = registry_for(fake)
        self.http_request = make_http_request(reactor)
        self._started: list[VaultManager] = []
        self._listeners: list[ChangeListener] = []
        self.metrics: list[Registry] = []

    async def listener(self) -> ChangeListener:
        ln = ChangeListener(
            self.db_url, reactor=reactor, ping_interval=0.2, min_backoff=0.05, max_backoff=0.2
        )
        await ln.startService()
        self._listeners.append(ln)
        return ln

    def make(
        self, kek, kek_new=None, *, listener=None, database=None, registry=None, **kw
    ) -> VaultManager:
        metrics = Registry()
        self.metrics.append(metrics)
        return VaultManager(
            ProviderKeyStore(database or self.database),
            registry or self.registry,
            kek=kek,
            kek_new=kek_new,
            http_request=self.http_request,
            listener=listener,
            reactor=reactor,
            metrics=metrics,
            **kw,
        )

    async def start(self, kek, kek_new=None, **kw) -> VaultManager:
        vault = self.make(kek, kek_new, **kw)
        await vault.start()
        self._started.append(vault)
        return vault

    async def close(self) -> None:
        for v in self._started:
            await v.stop()
        for ln in self._listeners:
            ln.stopService()


@pytest_twisted.async_yield_fixture
async def fake():
    server = await FakeProviderServer.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def vaults(database, db_url, fake):
    v = Vaults(database, db_url, fake)
    yield v
    await v.close()


@pytest.fixture
def orgs(database) -> OrgManager:
    return OrgManager(OrgStore(database), ApiKeyStore(database))


@pytest.fixture
def kek() -> Secret[bytes]:
    return new_kek()


def stored_rows(url: str) -> list[tuple]:
    return sql(
        url,
        "SELECT id::text, org_id::text, provider, name, last4, kek_id, ciphertext, wrapped_dek "
        "FROM provider_keys ORDER BY created_at",
    )


# --- adding keys ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_key_validates_then_stores_encrypted(vaults, orgs, kek, fake, db_url):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    assert vault.provider_key(org.id, "openai") is None

    info = await vault.add_key(org.id, "openai", OPENAI_KEY, "production")
    assert isinstance(info, ProviderKeyInfo)
    assert (info.org_id, info.provider, info.name, info.last4, info.enabled) == (
        org.id,
        "openai",
        "production",
        OPENAI_KEY[-4:],
        True,
    )
    assert OPENAI_KEY not in repr(info)
    # validated with the provider, with the provider's own auth header
    [seen] = fake.resource.calls("openai")
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.header("authorization") == f"Bearer {OPENAI_KEY}"

    # stored sealed: no plaintext in any column, wrapped by this master key
    [(id_, org_id, provider, name, last4, kek_id, ct, wdek)] = stored_rows(db_url)
    assert (id_, org_id, provider, name, last4) == (
        info.id,
        org.id,
        "openai",
        "production",
        OPENAI_KEY[-4:],
    )
    assert kek_id == kek_fingerprint(kek.reveal())
    assert OPENAI_KEY.encode() not in bytes(ct) + bytes(wdek)

    # usable at once on this node, decrypted per call
    secret = vault.provider_key(org.id, "openai")
    assert isinstance(secret, Secret) and repr(secret) == "<redacted>"
    assert secret.reveal() == OPENAI_KEY
    assert vault.provider_key(org.id, "anthropic") is None
    assert [k.id for k in await vault.list_keys(org.id)] == [info.id]


@pytest_twisted.ensureDeferred
async def test_anthropic_key_uses_its_header(vaults, orgs, kek, fake):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    await vault.add_key(org.id, "anthropic", Secret(ANTHROPIC_KEY))
    [seen] = fake.resource.calls("anthropic")
    assert seen.header("x-api-key") == ANTHROPIC_KEY
    assert seen.header("anthropic-version")
    assert seen.header("authorization") is None
    assert vault.provider_key(org.id, "anthropic").reveal() == ANTHROPIC_KEY
    assert vault.provider_key(org.id, "openai") is None


@pytest_twisted.ensureDeferred
async def test_refused_key_is_422_naming_the_reason_and_nothing_is_stored(
    vaults, orgs, kek, fake, db_url
):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    bad = "sk-test-refused-by-provider-1234"
    with pytest.raises(Unprocessable) as e:
        await vault.add_key(org.id, "openai", bad)
    assert e.value.status == 422 and e.value.code == "provider_key_refused"
    assert "OpenAI refused the key" in e.value.message
    assert "Incorrect API key provided" in e.value.message  # the provider's reason
    assert bad not in e.value.message and bad[-8:] not in e.value.message
    with pytest.raises(Unprocessable) as e:
        await vault.add_key(org.id, "anthropic", bad)
    assert "invalid x-api-key" in e.value.message
    assert stored_rows(db_url) == []
    assert vault.provider_key(org.id, "openai") is None


@pytest_twisted.ensureDeferred
async def test_a_provider_reason_that_echoes_the_key_is_scrubbed(vaults, orgs, kek, fake, db_url):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    fake.resource.next(
        Script(
            status=403,
            body=json.dumps({"error": {"message": f"key {OPENAI_KEY} lacks scope"}}).encode(),
        )
    )
    with pytest.raises(Unprocessable) as e:
        await vault.add_key(org.id, "openai", OPENAI_KEY)
    assert OPENAI_KEY not in e.value.message and "lacks scope" in e.value.message
    assert stored_rows(db_url) == []


@pytest_twisted.ensureDeferred
async def test_unreachable_provider_is_502_and_nothing_is_stored(vaults, orgs, kek, db_url):
    org, _ = await orgs.create_org("Acme")
    closed = ProviderRegistry([OpenAI("http://127.0.0.1:1/openai"), Anthropic()])
    vault = await vaults.start(kek, registry=closed)
    with pytest.raises(UpstreamUnavailable) as e:
        await vault.add_key(org.id, "openai", OPENAI_KEY)
    assert e.value.status == 502
    assert (
        "OpenAI could not be reached" in e.value.message and "nothing was stored" in e.value.message
    )
    assert OPENAI_KEY not in str(e.value)
    assert stored_rows(db_url) == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "script",
    [
        Script(status=500, body=b'{"error":{"message":"overloaded"}}'),
        Script(status=302, redirect_to="http://127.0.0.1:1/elsewhere"),
    ],
    ids=["server-error", "redirect"],
)
async def test_provider_errors_and_redirects_are_502_and_not_followed(
    vaults, orgs, kek, fake, db_url, script
):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    fake.resource.next(script)
    with pytest.raises(UpstreamUnavailable):
        await vault.add_key(org.id, "openai", OPENAI_KEY)
    assert len(fake.resource.calls()) == 1  # the redirect was not followed
    assert stored_rows(db_url) == []


@pytest_twisted.ensureDeferred
async def test_a_provider_stalling_mid_body_cannot_hang_adding_a_key(
    vaults, orgs, kek, fake, db_url
):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek, validation_timeout=0.5)
    fake.resource.next(Script(stall_after=b'{"object": "list", "data": ['))
    started = reactor.seconds()
    with pytest.raises(UpstreamUnavailable) as e:
        await vault.add_key(org.id, "openai", OPENAI_KEY)
    assert reactor.seconds() - started < 3.0
    assert (e.value.status, e.value.code) == (502, "provider_unreachable")
    assert "no complete answer within 0.5s (reading the response body)" in e.value.message
    assert "nothing was stored" in e.value.message and OPENAI_KEY not in e.value.message
    assert stored_rows(db_url) == []


@pytest_twisted.ensureDeferred
async def test_a_validation_404_is_reported_as_an_answer_with_the_url(vaults, orgs, kek, fake):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    fake.resource.next(Script(status=404, body=b"not here"))
    with pytest.raises(UpstreamUnavailable) as e:
        await vault.add_key(org.id, "openai", OPENAI_KEY)
    assert (e.value.status, e.value.code) == (502, "provider_error")
    assert f"OpenAI answered 404 Not Found to GET {fake.openai_base_url}/v1/models" in (
        e.value.message
    )
    assert "reach" not in e.value.message


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "key",
    [
        " sk-test-leading-space-0000",
        "sk-test-trailing-space-0000 ",
        "sk-test-inner space-0000",
        "sk-test-tab\t-0000",
        "sk-test-newline\n-0000",
        "sk-test-nul\x00-0000",
        "sk-test-del\x7f-0000",
        "sk-test-non-ascii-é-0000",
        "sk-test-nbsp\u00a0-0000",
        "short",
        "s" * 1025,
        "",
        12345678,
        None,
        b"sk-test-bytes-000000",
    ],
)
async def test_malformed_keys_are_rejected_before_any_provider_call(
    vaults, orgs, kek, fake, db_url, key
):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    with pytest.raises(BadRequest) as e:
        await vault.add_key(org.id, "openai", key)
    if isinstance(key, str) and len(key) > 4:
        assert key.strip() not in e.value.message
    assert fake.resource.calls() == []
    assert stored_rows(db_url) == []


@pytest_twisted.ensureDeferred
async def test_unknown_org_or_provider(vaults, orgs, kek, fake):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    with pytest.raises(BadRequest) as e:
        await vault.add_key(org.id, "mistral", OPENAI_KEY)
    assert "openai, anthropic" in e.value.message
    with pytest.raises(BadRequest):
        await vault.add_key(org.id, None, OPENAI_KEY)
    for missing in (str(uuid.uuid4()), "not-a-uuid", None):
        with pytest.raises(NotFound):
            await vault.add_key(missing, "openai", OPENAI_KEY)
        with pytest.raises(NotFound):
            await vault.list_keys(missing)
    with pytest.raises(BadRequest):
        await vault.add_key(org.id, "openai", OPENAI_KEY, name="tab\tname")
    assert fake.resource.calls() == []  # nothing was validated for a request refused early


@pytest_twisted.ensureDeferred
async def test_several_keys_the_newest_enabled_one_is_used(vaults, orgs, kek, fake):
    fake.resource.keys["openai"].add(OPENAI_KEY_2)
    org, _ = await orgs.create_org("Acme")
    other, _ = await orgs.create_org("Other")
    vault = await vaults.start(kek)
    first = await vault.add_key(org.id, "openai", OPENAI_KEY, "first")
    second = await vault.add_key(org.id, "openai", OPENAI_KEY_2, "second")
    await vault.add_key(other.id, "openai", OPENAI_KEY)
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY_2
    listed = await vault.list_keys(org.id)
    assert [(k.id, k.name, k.last4) for k in listed] == [
        (second.id, "second", "WXYZ"),
        (first.id, "first", OPENAI_KEY[-4:]),
    ]
    # disabled: skipped, the older one is used; enabled again: back
    off = await vault.set_key_enabled(org.id, second.id, False)
    assert off.enabled is False
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY
    await vault.set_key_enabled(org.id, second.id, True)
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY_2
    # deleted: the older one again; deleting twice is NotFound
    await vault.delete_key(org.id, second.id)
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY
    with pytest.raises(NotFound):
        await vault.delete_key(org.id, second.id)
    # another org's key id is not found through this org
    other_key = (await vault.list_keys(other.id))[0]
    with pytest.raises(NotFound):
        await vault.delete_key(org.id, other_key.id)
    await vault.delete_key(org.id, first.id)
    assert vault.provider_key(org.id, "openai") is None
    assert await vault.list_keys(org.id) == []
    assert vault.provider_key(other.id, "openai").reveal() == OPENAI_KEY


@pytest_twisted.ensureDeferred
async def test_a_key_that_leaves_the_cache_leaves_nothing_behind(vaults, orgs, kek, fake):
    """A key's unwrapped data key is kept while the key is usable, and
    forgotten once it is disabled or deleted (on every node: the reload that
    follows the notification drops it)."""
    fake.resource.keys["openai"].add(OPENAI_KEY_2)
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    first = await vault.add_key(org.id, "openai", OPENAI_KEY)
    second = await vault.add_key(org.id, "openai", OPENAI_KEY_2)
    for key in vault.pool(org.id, "openai"):
        assert vault.reveal(key) is not None
    assert set(vault._prepared) == {first.id, second.id}
    await vault.set_key_enabled(org.id, second.id, False)
    assert set(vault._prepared) == {first.id}
    held = vault.pool(org.id, "openai")[0]  # picked before the key goes
    await vault.delete_key(org.id, first.id)
    assert vault._prepared == {}
    # an attempt that picked it just before may still use it, but it is not kept again
    assert vault.reveal(held).reveal() == OPENAI_KEY
    assert vault._prepared == {}


@pytest_twisted.ensureDeferred
async def test_the_hot_path_never_touches_the_database(vaults, orgs, kek, db_url):
    from lectr.db.database import Database

    org, _ = await orgs.create_org("Acme")
    own_db = Database(db_url, reactor=reactor, min_size=1, max_size=2)
    await own_db.start()
    vault = await vaults.start(kek, database=own_db)
    await vault.add_key(org.id, "openai", OPENAI_KEY)
    await own_db.close()  # any query now fails
    for _ in range(100):
        assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY


# --- binding and damage -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_row_moved_to_another_org_or_provider_does_not_decrypt(
    vaults, orgs, kek, fake, db_url
):
    fake.resource.keys["openai"].add(OPENAI_KEY_2)
    a, _ = await orgs.create_org("A")
    b, _ = await orgs.create_org("B")
    writer = await vaults.start(kek)
    key_a = await writer.add_key(a.id, "openai", OPENAI_KEY)
    key_b = await writer.add_key(b.id, "openai", OPENAI_KEY_2)
    c, _ = await orgs.create_org("C")
    await writer.add_key(c.id, "openai", OPENAI_KEY)  # untouched
    # an attacker with write access copies A's sealed key over B's row...
    sql(
        db_url,
        "UPDATE provider_keys AS b SET ciphertext = a.ciphertext, nonce = a.nonce, "
        "wrapped_dek = a.wrapped_dek, dek_nonce = a.dek_nonce "
        "FROM provider_keys AS a WHERE a.id = %s AND b.id = %s",
        (key_a.id, key_b.id),
    )
    # ...and relabels A's row as an Anthropic key
    sql(db_url, "UPDATE provider_keys SET provider = 'anthropic' WHERE id = %s", (key_a.id,))
    reader = await vaults.start(kek)
    assert reader.provider_key(b.id, "openai") is None
    assert reader.provider_key(a.id, "anthropic") is None
    assert reader.provider_key(c.id, "openai").reveal() == OPENAI_KEY
    assert vaults.metrics[-1].get("lectr_vault_decrypt_failures_total").value() == 2
    # logged once per row, not once per request
    assert reader.provider_key(b.id, "openai") is None
    assert vaults.metrics[-1].get("lectr_vault_decrypt_failures_total").value() == 2


@pytest_twisted.ensureDeferred
async def test_a_damaged_newest_key_falls_back_to_the_previous_one(vaults, orgs, kek, fake, db_url):
    fake.resource.keys["openai"].add(OPENAI_KEY_2)
    org, _ = await orgs.create_org("Acme")
    writer = await vaults.start(kek)
    await writer.add_key(org.id, "openai", OPENAI_KEY)
    newest = await writer.add_key(org.id, "openai", OPENAI_KEY_2)
    sql(
        db_url,
        "UPDATE provider_keys SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1) "
        "WHERE id = %s",
        (newest.id,),
    )
    reader = await vaults.start(kek)
    assert reader.provider_key(org.id, "openai").reveal() == OPENAI_KEY


# --- master key at start-up -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wrong_master_key_is_a_clear_start_up_error(vaults, orgs, kek, db_url):
    org, _ = await orgs.create_org("Acme")
    writer = await vaults.start(kek)
    await writer.add_key(org.id, "openai", OPENAI_KEY)
    wrong = new_kek()
    with pytest.raises(VaultKeyError) as e:
        await vaults.make(wrong).start()
    message = str(e.value)
    assert "\n" not in message
    assert "ENCRYPTION_KEY does not match" in message
    assert kek_fingerprint(kek.reveal()) in message  # which key the rows need
    assert kek_fingerprint(wrong.reveal()) in message  # which key was given
    for k in (kek, wrong):
        assert base64.b64encode(k.reveal()).decode() not in message
        assert k.reveal().hex() not in message
    # the right key as the *new* key of a rotation opens them too
    vault = await vaults.start(wrong, kek)
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY


@pytest_twisted.ensureDeferred
async def test_a_fingerprint_that_matches_but_does_not_unwrap_is_refused(vaults, orgs, kek, db_url):
    org, _ = await orgs.create_org("Acme")
    writer = await vaults.start(kek)
    await writer.add_key(org.id, "openai", OPENAI_KEY)
    sql(db_url, "UPDATE provider_keys SET wrapped_dek = sha256(wrapped_dek) || wrapped_dek")
    with pytest.raises(VaultKeyError) as e:
        await vaults.make(kek).start()
    assert "does not unwrap" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_any_master_key_starts_an_empty_vault(vaults):
    vault = await vaults.start(new_kek())
    status = await vault.rotation_status()
    assert status.rows_by_kek == {} and status.done and status.next_kek is None


# --- coherence across nodes --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_changes_reach_other_nodes_through_notifications(vaults, orgs, kek, fake, db_url):
    fake.resource.keys["openai"].add(OPENAI_KEY_2)
    org, _ = await orgs.create_org("Acme")
    node_a = await vaults.start(kek, listener=await vaults.listener())
    node_b = await vaults.start(kek, listener=await vaults.listener())
    assert node_b.provider_key(org.id, "openai") is None

    started = reactor.seconds()
    first = await node_a.add_key(org.id, "openai", OPENAI_KEY)
    await wait_for(lambda: node_b.provider_key(org.id, "openai") is not None)
    took = reactor.seconds() - started
    print(f"added key usable on another node {took * 1000:.1f} ms after the call")
    assert node_b.provider_key(org.id, "openai").reveal() == OPENAI_KEY

    await node_a.add_key(org.id, "openai", OPENAI_KEY_2)
    await wait_for(lambda: node_b.provider_key(org.id, "openai").reveal() == OPENAI_KEY_2)
    await node_a.delete_key(org.id, (await node_a.list_keys(org.id))[0].id)
    await wait_for(lambda: node_b.provider_key(org.id, "openai").reveal() == OPENAI_KEY)

    # deleting the org drops its keys everywhere (cascade + org notification)
    await orgs.delete_org(org.id)
    await wait_for(lambda: node_b.provider_key(org.id, "openai") is None)
    assert node_a.provider_key(org.id, "openai") is None
    assert first.id not in {r[0] for r in stored_rows(db_url)}


@pytest_twisted.ensureDeferred
async def test_listener_reset_reloads_everything(vaults, orgs, kek, db_url):
    org, _ = await orgs.create_org("Acme")
    node = await vaults.start(kek, listener=await vaults.listener())
    await node.add_key(org.id, "openai", OPENAI_KEY)
    await deferLater(reactor, 0.3)  # let the add's own notification arrive and reload
    await wait_for(lambda: node._reloader.idle)
    # a change the node never hears of (no notification)...
    sql(db_url, "UPDATE provider_keys SET enabled = false")
    await deferLater(reactor, 0.2)
    assert node.provider_key(org.id, "openai") is not None
    # ...is picked up by the reload after the listener reconnects
    sql(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'lectr-listener' AND datname = current_database()",
    )
    await wait_for(lambda: node.provider_key(org.id, "openai") is None)


@pytest_twisted.ensureDeferred
async def test_notifications_carry_ids_only(vaults, orgs, kek, db_url):
    org, _ = await orgs.create_org("Acme")
    vault = await vaults.start(kek)
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("LISTEN lectr_changes")
        info = await vault.add_key(org.id, "openai", OPENAI_KEY)
        await vault.delete_key(org.id, info.id)
        await deferLater(reactor, 0.1)
        conn.poll()
        payloads = [n.payload for n in conn.notifies]
    finally:
        conn.close()
    assert payloads == [f"provider_key:{org.id}", f"provider_key:{org.id}"]
