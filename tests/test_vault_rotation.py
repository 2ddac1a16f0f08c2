"""Master-key rotation (ENCRYPTION_KEY_NEW) on a real PostgreSQL, with
"traffic": provider_key() read continuously while DEKs are rewrapped."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from lectr.db.database import DatabaseUnavailable
from lectr.managers.orgs import OrgManager
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.storage.provider_keys import NewProviderKey, ProviderKeyStore
from lectr.vault.crypto import Binding, Keyring, kek_fingerprint
from lectr.vault.errors import VaultKeyError
from tests.support.fake_provider import OPENAI_KEY
from tests.test_vault import Vaults, new_kek, sql, wait_for


@pytest_twisted.async_yield_fixture
async def fake():
    from tests.support.fake_provider import FakeProviderServer

    server = await FakeProviderServer.start()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def vaults(database, db_url, fake):
    v = Vaults(database, db_url, fake)
    yield v
    await v.close()


FAST_CENSUS = {"census_interval": 0.2, "census_wait": 0.1, "census_ttl": 1.0}


@pytest.fixture
def log_lines():
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


async def seed(database, kek, *, orgs: int, keys_per_provider: int = 2) -> dict:
    """Store keys directly (sealed with ``kek``, no provider validation).
    Returns (org, provider) -> the plaintext of its newest key."""
    org_manager = OrgManager(OrgStore(database), ApiKeyStore(database))
    store = ProviderKeyStore(database)
    ring = Keyring(kek)
    newest: dict[tuple[str, str], str] = {}
    for i in range(orgs):
        org, _ = await org_manager.create_org(f"org {i} {uuid.uuid4().hex[:8]}")
        for provider in ("openai", "anthropic"):
            for k in range(keys_per_provider):
                plaintext = f"sk-{provider}-{i:04d}-{k}-{uuid.uuid4().hex}"
                record_id = str(uuid.uuid4())
                sealed = ring.seal(Binding(org.id, provider, record_id), plaintext.encode())
                await store.insert(
                    NewProviderKey(
                        record_id,
                        org.id,
                        provider,
                        f"key {k}",
                        plaintext[-4:],
                        sealed.ciphertext,
                        sealed.nonce,
                        sealed.wrapped_dek,
                        sealed.dek_nonce,
                        sealed.kek_id,
                    )
                )
                newest[(org.id, provider)] = plaintext
    return newest


def crypto_columns(url: str) -> dict[str, tuple]:
    rows = sql(
        url, "SELECT id::text, ciphertext, nonce, wrapped_dek, dek_nonce, kek_id FROM provider_keys"
    )
    return {r[0]: (bytes(r[1]), bytes(r[2]), bytes(r[3]), bytes(r[4]), r[5]) for r in rows}


class Traffic:
    """Reads every org's key every millisecond, like the proxy would, and
    counts reads that did not return the expected key."""

    def __init__(self, vault, expected: dict) -> None:
        self.vault = vault
        self.expected = expected
        self.reads = 0
        self.failures: list[tuple] = []
        self._loop = LoopingCall(self._tick)

    def start(self) -> None:
        self._loop.start(0.001)

    def stop(self) -> None:
        self._loop.stop()

    def _tick(self) -> None:
        for (org_id, provider), plaintext in list(self.expected.items()):
            got = self.vault.provider_key(org_id, provider)
            self.reads += 1
            if got is None or got.reveal() != plaintext:
                self.failures.append((org_id, provider))


@pytest_twisted.ensureDeferred
async def test_rotation_under_traffic(vaults, database, db_url, log_lines, fake):
    old, new = new_kek(), new_kek()
    expected = await seed(database, old, orgs=40)  # 160 rows
    before = crypto_columns(db_url)
    assert {v[4] for v in before.values()} == {kek_fingerprint(old.reveal())}

    node = await vaults.start(
        old,
        new,
        listener=await vaults.listener(),
        rewrap_batch_size=7,
        rewrap_interval=0.005,
        **FAST_CENSUS,
    )
    traffic = Traffic(node, expected)
    traffic.start()
    # writes keep working during the rotation, and use the new key
    new_org, _ = await OrgManager(OrgStore(database), ApiKeyStore(database)).create_org("new")
    added = await node.add_key(new_org.id, "openai", OPENAI_KEY)
    expected[(new_org.id, "openai")] = OPENAI_KEY
    status = await node.rotation_status()
    assert status.current_kek == kek_fingerprint(old.reveal())
    assert status.next_kek == kek_fingerprint(new.reveal())

    await wait_for(lambda: node._rewrapper.done, timeout=60)
    await deferLater(reactor, 0.2)  # traffic on the settled caches too
    traffic.stop()

    assert traffic.failures == []
    assert traffic.reads > 1000
    print(f"rotation: {len(before)} rows, {traffic.reads} reads during it, 0 failures")
    status = await node.rotation_status()
    assert status.done and status.rows_by_kek == {kek_fingerprint(new.reveal()): len(before) + 1}
    after = crypto_columns(db_url)
    for id_, (ct, nonce, wdek, dnonce, _) in before.items():
        # the provider keys were not re-encrypted, only their DEKs rewrapped
        assert after[id_][:2] == (ct, nonce)
        assert after[id_][2] != wdek and after[id_][3] != dnonce
        assert after[id_][4] == kek_fingerprint(new.reveal())
    assert after[added.id][4] == kek_fingerprint(new.reveal())
    [complete] = [line for line in log_lines if "rotation complete" in line]
    assert "set ENCRYPTION_KEY to the value of ENCRYPTION_KEY_NEW" in complete
    assert "remove ENCRYPTION_KEY_NEW" in complete

    # the operator's next step: only the new key
    await node.stop()
    restarted = await vaults.start(new)
    for (org_id, provider), plaintext in expected.items():
        assert restarted.provider_key(org_id, provider).reveal() == plaintext
    assert (await restarted.rotation_status()).done
    # and the old key alone no longer opens anything
    with pytest.raises(VaultKeyError):
        await vaults.make(old).start()


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_the_rewrap(vaults, database, db_url):
    old, new = new_kek(), new_kek()
    expected = await seed(database, old, orgs=25)  # 100 rows
    a = await vaults.start(
        old,
        new,
        listener=await vaults.listener(),
        rewrap_batch_size=5,
        rewrap_interval=0.001,
        **FAST_CENSUS,
    )
    b = await vaults.start(
        old,
        new,
        listener=await vaults.listener(),
        rewrap_batch_size=5,
        rewrap_interval=0.001,
        **FAST_CENSUS,
    )
    traffic = [Traffic(a, expected), Traffic(b, expected)]
    for t in traffic:
        t.start()
    await wait_for(lambda: a._rewrapper.done and b._rewrapper.done, timeout=60)
    for t in traffic:
        t.stop()
        assert t.failures == []
    done_a, done_b = a._rewrapper._rewrapped_total, b._rewrapper._rewrapped_total
    print(f"node a rewrapped {done_a}, node b {done_b}")
    assert done_a + done_b == len(expected) * 2  # every row exactly once
    assert set(v[4] for v in crypto_columns(db_url).values()) == {kek_fingerprint(new.reveal())}


@pytest_twisted.ensureDeferred
async def test_rewrapping_again_changes_nothing(vaults, database, db_url):
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=3)
    node = await vaults.start(old, new, rewrap_interval=3600)  # drive it by hand
    rewrapper = node._rewrapper
    await wait_for(lambda: rewrapper._loop.running and rewrapper._in_flight.called)
    await rewrapper._tick()
    settled = crypto_columns(db_url)
    assert await rewrapper.run_once() == 0
    assert crypto_columns(db_url) == settled


@pytest_twisted.ensureDeferred
async def test_the_loop_survives_failed_batches(vaults, database, db_url, log_lines):
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=5)
    node = vaults.make(old, new, rewrap_batch_size=3, rewrap_interval=0.01)
    store = node._rewrapper._store
    real = store.rewrap_batch
    calls: list[int] = []

    async def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 3):
            raise DatabaseUnavailable("rewrap_provider_keys: connection lost (test)")
        return await real(*args, **kwargs)

    store.rewrap_batch = flaky
    await node.start()
    vaults._started.append(node)
    await wait_for(lambda: node._rewrapper.done, timeout=30)
    assert vaults.metrics[-1].get("lectr_vault_rewrap_failures_total").value() == 2
    assert sum("a rewrap batch failed; retrying" in line for line in log_lines) == 2
    assert (await node.rotation_status()).done


@pytest_twisted.ensureDeferred
async def test_a_damaged_row_is_reported_and_does_not_stop_the_others(
    vaults, database, db_url, log_lines
):
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=4)
    [(damaged,)] = sql(db_url, "SELECT id::text FROM provider_keys ORDER BY id LIMIT 1")
    sql(
        db_url,
        "UPDATE provider_keys SET wrapped_dek = set_byte(wrapped_dek, 3, "
        "get_byte(wrapped_dek, 3) # 255) WHERE id = %s",
        (damaged,),
    )
    node = await vaults.start(old, new, rewrap_batch_size=4, rewrap_interval=0.005)
    await wait_for(lambda: any("rotation stalled" in line for line in log_lines), timeout=30)
    status = await node.rotation_status()
    assert not status.done
    assert status.rows_by_kek == {
        kek_fingerprint(old.reveal()): 1,
        kek_fingerprint(new.reveal()): 15,
    }
    errors = [line for line in log_lines if "cannot be rewrapped" in line]
    assert len(errors) == 1 and damaged in errors[0]
    assert node._rewrapper._loop.running  # still checking, now and then


@pytest_twisted.ensureDeferred
async def test_rows_written_with_the_old_key_after_completion_are_rewrapped(
    vaults, database, db_url, log_lines
):
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=2)
    node = await vaults.start(
        old, new, rewrap_batch_size=50, rewrap_interval=0.005, rewrap_idle_interval=0.05
    )
    await wait_for(lambda: node._rewrapper.done, timeout=30)
    # a node that was not given ENCRYPTION_KEY_NEW stores a key with the old one
    await seed(database, old, orgs=1, keys_per_provider=1)
    await wait_for(lambda: any("after the rotation completed" in line for line in log_lines))
    assert set(v[4] for v in crypto_columns(db_url).values()) == {kek_fingerprint(new.reveal())}


# --- several nodes: the census ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rotation_waits_until_every_node_holds_the_new_key(
    vaults, database, db_url, log_lines
):
    """A rolling restart: one node has ENCRYPTION_KEY_NEW, another not yet.
    Nothing is rewrapped (the other node could not read it) until that node
    restarts with the new key too; no read fails on either node."""
    old, new = new_kek(), new_kek()
    expected = await seed(database, old, orgs=10)
    laggard = await vaults.start(old, listener=await vaults.listener())
    on_laggard = Traffic(laggard, expected)
    on_laggard.start()
    rotating = await vaults.start(
        old,
        new,
        listener=await vaults.listener(),
        rewrap_batch_size=5,
        rewrap_interval=0.01,
        **FAST_CENSUS,
    )
    on_rotating = Traffic(rotating, expected)
    on_rotating.start()
    await wait_for(lambda: any("rotation waiting" in line for line in log_lines))
    [waiting] = [line for line in log_lines if "rotation waiting" in line]
    assert laggard._census.node_id in waiting and rotating._census.node_id not in waiting
    assert "set ENCRYPTION_KEY_NEW on every node" in waiting
    await deferLater(reactor, 0.5)
    status = await rotating.rotation_status()
    assert status.rows_by_kek == {kek_fingerprint(old.reveal()): len(expected) * 2}
    assert vaults.metrics[1].get("lectr_vault_rotation_blocking_nodes").value() == 1

    # the laggard restarts with the new key: the rotation proceeds
    await laggard.stop()
    on_laggard.stop()
    upgraded = await vaults.start(old, new, listener=await vaults.listener(), **FAST_CENSUS)
    on_upgraded = Traffic(upgraded, expected)
    on_upgraded.start()
    await wait_for(lambda: rotating._rewrapper.done and upgraded._rewrapper.done, timeout=30)
    on_rotating.stop()
    on_upgraded.stop()
    assert any("rotation resumes" in line for line in log_lines)
    for traffic in (on_laggard, on_rotating, on_upgraded):
        assert traffic.reads and traffic.failures == []
    assert (await rotating.rotation_status()).done


@pytest_twisted.ensureDeferred
async def test_a_silent_node_is_forgotten_after_the_ttl(vaults, database, db_url, log_lines):
    """A node that went away without saying so (crash) holds the rotation
    back only until it has not answered for ``census_ttl`` seconds."""
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=3)
    crashed_listener = await vaults.listener()
    await vaults.start(old, listener=crashed_listener)
    rotating = await vaults.start(
        old, new, listener=await vaults.listener(), rewrap_interval=0.01, **FAST_CENSUS
    )
    await wait_for(lambda: any("rotation waiting" in line for line in log_lines))
    crashed_listener.stopService()  # it hears no probe and answers none from now on
    await wait_for(lambda: rotating._rewrapper.done, timeout=30)
    assert any("rotation resumes" in line for line in log_lines)


@pytest_twisted.ensureDeferred
async def test_a_node_without_the_new_key_cannot_join_a_rotation(vaults, database, db_url):
    old, new = new_kek(), new_kek()
    await seed(database, old, orgs=5)
    rotating = await vaults.start(old, new, rewrap_batch_size=4, rewrap_interval=3600)
    await wait_for(lambda: rotating._rewrapper._rewrapped_total == 4)  # the first batch only
    with pytest.raises(VaultKeyError) as e:
        await vaults.make(old).start()
    message = str(e.value)
    assert "4 stored provider key(s) are wrapped by a master key this node does not hold" in message
    assert "rotation is under way or unfinished" in message
    assert "ENCRYPTION_KEY=<old key> and ENCRYPTION_KEY_NEW=<new key>" in message
    assert kek_fingerprint(new.reveal()) in message
