"""Per-org provider settings: the matching rules the proxy enforces, and the
manager on a real PostgreSQL (validation, notifications, other nodes)."""

from __future__ import annotations

import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from lectr.db.notify import ChangeListener
from lectr.errors import BadRequest, NotFound
from lectr.managers.orgs import OrgManager
from lectr.managers.provider_settings import (
    ProviderSettings,
    ProviderSettingsManager,
    clean_patterns,
    default_settings,
)
from lectr.providers import ProviderRegistry
from lectr.providers.catalogue.anthropic import Anthropic
from lectr.providers.catalogue.openai import OpenAI
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.orgs import OrgStore
from lectr.storage.provider_settings import ProviderSettingsStore
from tests.support.pg import admin_execute


def settings(allowed=(), blocked=(), enabled=True) -> ProviderSettings:
    return ProviderSettings("org", "openai", enabled, tuple(allowed), tuple(blocked), None)


# --- the rules (used by the proxy) -------------------------------------------------------


@pytest.mark.parametrize(
    "allowed,blocked,model,expected",
    [
        # no lists: everything
        ((), (), "gpt-4o", True),
        ((), (), "anything-at-all", True),
        # requests without a model are not subject to the lists
        (("gpt-4o",), (), None, True),
        ((), ("*",), None, True),
        # exact names
        (("gpt-4o",), (), "gpt-4o", True),
        (("gpt-4o",), (), "gpt-4o-mini", False),
        (("gpt-4o",), (), "gpt-4", False),
        # prefix patterns
        (("gpt-4o*",), (), "gpt-4o", True),
        (("gpt-4o*",), (), "gpt-4o-mini-2024-07-18", True),
        (("gpt-4o*",), (), "gpt-4", False),
        (("claude-3-5-*", "gpt-4o"), (), "claude-3-5-haiku-latest", True),
        (("*",), (), "whatever", True),
        # block wins over allow
        (("gpt-4o*",), ("gpt-4o",), "gpt-4o", False),
        (("gpt-4o*",), ("gpt-4o",), "gpt-4o-mini", True),
        (("gpt-*",), ("gpt-4o*",), "gpt-4o-mini", False),
        (("gpt-*",), ("gpt-4o*",), "gpt-4.1", True),
        (("*",), ("o1*",), "o1-preview", False),
        # an empty allow list allows everything not blocked
        ((), ("gpt-4o",), "gpt-4o", False),
        ((), ("gpt-4o",), "gpt-4o-mini", True),
        ((), ("*",), "gpt-4o", False),
        # case does not help to get around a block (nor is needed for an allow)
        ((), ("gpt-4o",), "GPT-4o", False),
        ((), ("gpt-4o*",), "Gpt-4O-Mini", False),
        (("gpt-4o",), (), "GPT-4O", True),
        # an empty model name is a model name like any other
        (("gpt-4o",), (), "", False),
        ((), (), "", True),
        # fine-tuned names
        (("ft:gpt-4o-mini*",), (), "ft:gpt-4o-mini:acme::abc123", True),
    ],
)
def test_allows_model(allowed, blocked, model, expected):
    assert settings(allowed, blocked).allows_model(model) is expected


def test_enabled_is_separate_from_the_model_lists():
    off = settings(enabled=False)
    assert off.enabled is False and off.allows_model("gpt-4o") is True


def test_defaults_and_equality():
    d = default_settings("o", "anthropic")
    assert (d.enabled, d.allowed_models, d.blocked_models, d.updated_at) == (True, (), (), None)
    assert d.allows_model("claude-3-5-haiku-latest")
    assert d == default_settings("o", "anthropic")
    import dataclasses

    assert [f.name for f in dataclasses.fields(d)] == [
        "org_id",
        "provider",
        "enabled",
        "allowed_models",
        "blocked_models",
        "updated_at",
    ]


@pytest.mark.parametrize(
    "value",
    [
        "gpt-4o",  # a string, not a list
        {"gpt-4o": True},
        [""],
        ["   "],
        ["gpt 4o"],
        ["gpt\n4o"],
        ["gpt\x00"],
        ["*gpt"],
        ["gpt-*-mini"],
        ["**"],
        [1],
        [None],
        ["x" * 201],
        ["m"] * 501,
    ],
)
def test_bad_patterns_are_rejected(value):
    with pytest.raises(BadRequest):
        clean_patterns(value, "allowed_models")


def test_patterns_are_trimmed_and_deduplicated():
    assert clean_patterns([" gpt-4o ", "gpt-4o", "o1*", "*"], "x") == ["gpt-4o", "o1*", "*"]
    assert clean_patterns((), "x") == []


# --- the manager ----------------------------------------------------------------------------


class Managers:
    def __init__(self, database, db_url) -> None:
        self.database = database
        self.db_url = db_url
        self.registry = ProviderRegistry([OpenAI(), Anthropic()])
        self._managers: list[ProviderSettingsManager] = []
        self._listeners: list[ChangeListener] = []

    async def start(self, with_listener: bool = False) -> ProviderSettingsManager:
        listener = None
        if with_listener:
            listener = ChangeListener(
                self.db_url, reactor=reactor, ping_interval=0.2, min_backoff=0.05, max_backoff=0.2
            )
            await listener.startService()
            self._listeners.append(listener)
        m = ProviderSettingsManager(
            ProviderSettingsStore(self.database), self.registry, listener, reactor
        )
        await m.start()
        self._managers.append(m)
        return m

    async def close(self) -> None:
        for m in self._managers:
            await m.stop()
        for ln in self._listeners:
            ln.stopService()


@pytest_twisted.async_yield_fixture
async def managers(database, db_url):
    m = Managers(database, db_url)
    yield m
    await m.close()


@pytest.fixture
def orgs(database) -> OrgManager:
    return OrgManager(OrgStore(database), ApiKeyStore(database))


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.005) -> float:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, step)
        waited += step
    return waited


@pytest_twisted.ensureDeferred
async def test_defaults_without_a_row(managers, orgs):
    org, _ = await orgs.create_org("Acme")
    m = await managers.start()
    s = m.get(org.id, "openai")
    assert (s.org_id, s.provider, s.enabled, s.allowed_models, s.blocked_models) == (
        org.id,
        "openai",
        True,
        (),
        (),
    )
    assert s.updated_at is None
    listed = await m.list(org.id)
    assert [x.provider for x in listed] == ["openai", "anthropic"]
    assert all(x.enabled and x.updated_at is None for x in listed)


@pytest_twisted.ensureDeferred
async def test_update_validates_stores_and_applies(managers, orgs, db_url):
    org, _ = await orgs.create_org("Acme")
    m = await managers.start()
    s = await m.update(org.id, "openai", allowed_models=["gpt-4o*", " gpt-4o-mini "])
    assert s.enabled and s.allowed_models == ("gpt-4o*", "gpt-4o-mini") and s.updated_at
    assert m.get(org.id, "openai") == s
    assert m.get(org.id, "anthropic").updated_at is None
    # partial updates keep the other fields
    s2 = await m.update(org.id, "openai", enabled=False)
    assert (s2.enabled, s2.allowed_models, s2.blocked_models) == (
        False,
        ("gpt-4o*", "gpt-4o-mini"),
        (),
    )
    s3 = await m.update(org.id, "openai", blocked_models=["gpt-4o-audio*"], allowed_models=[])
    assert (s3.enabled, s3.allowed_models, s3.blocked_models) == (False, (), ("gpt-4o-audio*",))
    assert m.get(org.id, "openai") == s3
    [row] = admin_execute(
        db_url,
        "SELECT enabled, allowed_models, blocked_models FROM org_provider_settings "
        "WHERE org_id = %s AND provider = 'openai'",
        (org.id,),
    )
    assert row == (False, [], ["gpt-4o-audio*"])
    assert [x.enabled for x in await m.list(org.id)] == [False, True]


@pytest_twisted.ensureDeferred
async def test_update_refuses_bad_input(managers, orgs):
    org, _ = await orgs.create_org("Acme")
    m = await managers.start()
    for missing in (str(uuid.uuid4()), "nope", None):
        with pytest.raises(NotFound):
            await m.update(missing, "openai", enabled=False)
        with pytest.raises(NotFound):
            await m.list(missing)
    for provider in ("mistral", None, 3):
        with pytest.raises(NotFound):
            await m.update(org.id, provider, enabled=False)
    for enabled in (1, "false", "yes"):
        with pytest.raises(BadRequest):
            await m.update(org.id, "openai", enabled=enabled)
    with pytest.raises(BadRequest):
        await m.update(org.id, "openai", allowed_models="gpt-4o")
    with pytest.raises(BadRequest):
        await m.update(org.id, "openai", blocked_models=["a b"])
    assert m.get(org.id, "openai").updated_at is None  # nothing stored


@pytest_twisted.ensureDeferred
async def test_changes_notify_and_reach_other_nodes_quickly(managers, orgs, db_url):
    org, _ = await orgs.create_org("Acme")
    node_a = await managers.start(with_listener=True)
    node_b = await managers.start(with_listener=True)
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("LISTEN lectr_changes")
        started = reactor.seconds()
        await node_a.update(org.id, "anthropic", enabled=False)
        await wait_for(lambda: not node_b.get(org.id, "anthropic").enabled, timeout=5)
        took = reactor.seconds() - started
        print(f"settings change applied on another node {took * 1000:.1f} ms after the call")
        for _ in range(100):  # the psycopg2 listener hears it on its own schedule
            conn.poll()
            if conn.notifies:
                break
            await deferLater(reactor, 0.02)
        assert [n.payload for n in conn.notifies] == [f"settings:{org.id}"]
    finally:
        conn.close()
    await node_a.update(org.id, "anthropic", enabled=True, blocked_models=["claude-2*"])
    await wait_for(lambda: not node_b.get(org.id, "anthropic").allows_model("claude-2.1"))
    assert node_b.get(org.id, "anthropic").enabled
    # a deleted org's rows leave every cache
    await orgs.delete_org(org.id)
    # (each node hears the notification on its own connection, in its own time)
    await wait_for(lambda: node_b.get(org.id, "anthropic").updated_at is None)
    await wait_for(lambda: node_a.get(org.id, "anthropic").updated_at is None)


@pytest_twisted.ensureDeferred
async def test_listener_reset_reloads_everything(managers, orgs, db_url):
    org, _ = await orgs.create_org("Acme")
    node = await managers.start(with_listener=True)
    # a change made without a notification (as if sent while disconnected)
    admin_execute(
        db_url,
        "INSERT INTO org_provider_settings (org_id, provider, enabled) VALUES (%s, 'openai', false)",
        (org.id,),
    )
    await deferLater(reactor, 0.2)
    assert node.get(org.id, "openai").enabled
    admin_execute(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'lectr-listener' AND datname = current_database()",
    )
    await wait_for(lambda: not node.get(org.id, "openai").enabled)


@pytest_twisted.ensureDeferred
async def test_get_never_touches_the_database(orgs, db_url):
    from lectr.db.database import Database

    org, _ = await orgs.create_org("Acme")
    db = Database(db_url, reactor=reactor, min_size=1, max_size=2)
    await db.start()
    m = ProviderSettingsManager(
        ProviderSettingsStore(db), ProviderRegistry([OpenAI(), Anthropic()]), None, reactor
    )
    await m.start()
    await m.update(org.id, "openai", blocked_models=["gpt-3.5*"])
    await db.close()
    for _ in range(100):
        assert not m.get(org.id, "openai").allows_model("gpt-3.5-turbo")
    await m.stop()
