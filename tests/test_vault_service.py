"""The vault inside the real LectrService (in-process, real ports, real
PostgreSQL): restart with a rotated master key, refusal of a wrong one, and
a rotation while requests flow through the proxy."""

from __future__ import annotations

import json
import random
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from lectr.config import parse_master_key
from lectr.storage.provider_keys import NewProviderKey
from lectr.vault.crypto import Binding, Keyring, kek_fingerprint
from lectr.vault.errors import VaultKeyError
from tests.support.fake_provider import OPENAI_KEY, FakeProviderServer
from tests.support.lectr_service import proxy_url, start_lectr
from tests.support.process import new_master_key
from tests.test_vault import sql, wait_for

pytestmark = pytest.mark.slow


@pytest_twisted.async_yield_fixture
async def fake():
    server = await FakeProviderServer.start()
    yield server
    await server.stop()


def fingerprint(b64: str) -> str:
    return kek_fingerprint(parse_master_key(b64).reveal())


async def start_failing(db_url, tmp_path, fake, **env) -> BaseException:
    """Start Lectr expecting a start-up failure; unwind what had started."""
    from dataclasses import replace

    from lectr.config import load_config
    from lectr.service import LectrService

    environ = {
        "DATABASE_URL": db_url,
        "LECTR_PROXY_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_ADMIN_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_DATA_DIR": str(tmp_path / "lectr-data"),
        "LECTR_ADMIN_TOKEN": "test-admin-token-0123456789",
        "LECTR_DB_POOL_MIN": "1",
        "LECTR_OPENAI_BASE_URL": fake.openai_base_url,
        "LECTR_ANTHROPIC_BASE_URL": fake.anthropic_base_url,
        **env,
    }
    service = LectrService(
        replace(load_config({}, environ)), reactor=reactor, exit_on_failure=False
    )
    service.running = True
    try:
        await service.start()
    except BaseException as e:
        await service.stopService()
        return e
    await service.stopService()
    raise AssertionError("Lectr started")


@pytest_twisted.ensureDeferred
async def test_components_rotation_and_restarts(db_url, tmp_path, fake):
    k1, k2 = new_master_key(), new_master_key()
    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k1)
    c = service.components
    assert c.vault is not None and c.settings is not None
    org, _ = await c.orgs.create_org("Acme")
    await c.vault.add_key(org.id, "openai", OPENAI_KEY)
    await c.settings.update(org.id, "openai", blocked_models=["gpt-3.5*"])
    await service.stopService()

    # ENCRYPTION_KEY_NEW set: the row is rewrapped in the background
    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k1, ENCRYPTION_KEY_NEW=k2)
    vault = service.components.vault
    assert vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY
    while not (status := await vault.rotation_status()).done:
        await deferLater(reactor, 0.05)
    assert status.rows_by_kek == {fingerprint(k2): 1}
    assert (status.current_kek, status.next_kek) == (fingerprint(k1), fingerprint(k2))
    await service.stopService()

    # the operator's next step: the new key alone
    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k2)
    c = service.components
    assert c.vault.provider_key(org.id, "openai").reveal() == OPENAI_KEY
    assert not c.settings.get(org.id, "openai").allows_model("gpt-3.5-turbo")
    status = await c.vault.rotation_status()
    assert status.done and status.next_kek is None
    await service.stopService()

    # the old key alone is refused at start-up, with a clear message
    error = await start_failing(db_url, tmp_path, fake, ENCRYPTION_KEY=k1)
    assert isinstance(error, VaultKeyError)
    assert "ENCRYPTION_KEY does not match" in str(error) and fingerprint(k2) in str(error)
    assert k1 not in str(error) and k2 not in str(error)


async def seed(db_url: str, service, kek_b64: str, fake, n_orgs: int) -> list[tuple[str, str]]:
    """Orgs, each with a Lectr key and an OpenAI key sealed with ``kek_b64``
    (stored without validation, as many as needed); the fake accepts them.
    Returns (Lectr key, provider key) per org."""
    from lectr.storage.provider_keys import ProviderKeyStore

    c = service.components
    store = ProviderKeyStore(c.database)
    ring = Keyring(parse_master_key(kek_b64))
    out = []
    for i in range(n_orgs):
        org, issued = await c.orgs.create_org(f"org {i}")
        plaintext = f"sk-test-load-{i:04d}-{uuid.uuid4().hex}"
        fake.resource.keys["openai"].add(plaintext)
        record_id = str(uuid.uuid4())
        sealed = ring.seal(Binding(org.id, "openai", record_id), plaintext.encode())
        await store.insert(
            NewProviderKey(
                record_id,
                org.id,
                "openai",
                "load",
                plaintext[-4:],
                sealed.ciphertext,
                sealed.nonce,
                sealed.wrapped_dek,
                sealed.dek_nonce,
                sealed.kek_id,
            )
        )
        out.append((issued.plaintext.reveal(), plaintext))
    return out


@pytest_twisted.ensureDeferred
async def test_rotation_under_load_through_the_proxy(db_url, tmp_path, fake):
    """Zero failed requests while every DEK is rewrapped, and each request
    reaches the provider with its own org's key."""
    k1, k2 = new_master_key(), new_master_key()
    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k1)
    orgs = await seed(db_url, service, k1, fake, n_orgs=120)
    await service.stopService()

    service = await start_lectr(db_url, tmp_path, fake, ENCRYPTION_KEY=k1, ENCRYPTION_KEY_NEW=k2)
    vault = service.components.vault
    vault._rewrapper._batch_size = 10  # small batches: the rotation spans many requests
    url = proxy_url(service, "/v1/chat/completions")
    statuses: list[int] = []
    stop = False

    async def client() -> None:
        while not stop:
            i = random.randrange(len(orgs))
            body = {"model": "gpt-4o-mini", "user": str(i), "messages": [{"role": "user"}]}
            resp = await treq.post(
                url,
                data=json.dumps(body).encode(),
                headers={
                    "authorization": [f"Bearer {orgs[i][0]}"],
                    "content-type": ["application/json"],
                },
                persistent=False,
            )
            await resp.content()
            statuses.append(resp.code)

    clients = [ensureDeferred(client()) for _ in range(4)]
    await wait_for(lambda: vault._rewrapper.done, timeout=120)
    done_at = len(statuses)
    await wait_for(lambda: len(statuses) >= done_at + 20, timeout=30)  # and after it
    stop = True
    await DeferredList(clients, consumeErrors=False)
    await service.stopService()

    print(f"{len(statuses)} requests through the proxy while {len(orgs)} keys were rewrapped")
    assert len(statuses) >= 40
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    # every provider call carried the key of the org that made it
    calls = fake.resource.calls("openai")
    assert len(calls) == len(statuses)
    for seen in calls:
        expected = orgs[int(seen.json()["user"])][1]
        assert seen.header("authorization") == f"Bearer {expected}"
    assert sql(db_url, "SELECT DISTINCT kek_id FROM provider_keys") == [(fingerprint(k2),)]
