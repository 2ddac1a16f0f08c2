"""One error format for the whole admin app: manager errors keep their
status and code, a lost database is a 503, anything else a generic 500 with
the traceback only in the log; a client that goes away cancels its handler.

The app runs on a real database; the manager standing in for the vault is a
stub that fails on purpose."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from lectr.admin.app import AdminApp
from lectr.admin.auth import AdminAuthenticator
from lectr.admin.site import AdminSite
from lectr.db.database import DatabaseUnavailable
from lectr.errors import Unprocessable, UpstreamUnavailable
from lectr.managers.orgs import OrgManager
from lectr.managers.users import UserManager
from lectr.metrics import Registry
from lectr.storage.api_keys import ApiKeyStore
from lectr.storage.members import MemberStore
from lectr.storage.orgs import OrgStore
from lectr.storage.users import UserStore
from lectr.util.secret import Secret

TOKEN = "unit-test-admin-token-0123"
AUTH = {b"authorization": [b"Bearer " + TOKEN.encode()]}


class FailingVault:
    """Raises what it is told to; ``hang`` never answers (and records its
    cancellation)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.hang = False
        self.cancelled = 0
        self.started = 0

    def add_key(self, org_id, provider, key, name=None, **options):
        self.started += 1
        if self.hang:

            def cancel(d):
                self.cancelled += 1

            return Deferred(cancel)
        raise self.error

    async def list_keys(self, org_id):
        raise self.error


@pytest.fixture
def vault() -> FailingVault:
    return FailingVault()


@pytest.fixture
def app(database, vault) -> AdminApp:
    users = UserManager(UserStore(database), MemberStore(database))
    return AdminApp(
        reactor=reactor,
        database=database,
        metrics=Registry(),
        users=users,
        authenticator=AdminAuthenticator(users=users, admin_token=Secret(TOKEN)),
        orgs=OrgManager(OrgStore(database), ApiKeyStore(database)),
        vault=vault,
    )


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


async def call(app: AdminApp, method: str, path: str, body=None):
    """Over real HTTP, through a loopback port serving ``app``."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        AdminSite(app.resource())
    )
    try:
        data = json.dumps(body).encode() if body is not None else None
        url = f"http://127.0.0.1:{port.getHost().port}{path}"
        response = await treq.request(method, url, headers=AUTH, data=data, persistent=False)
        return response.code, json.loads(await response.content() or b"null")
    finally:
        await port.stopListening()


async def new_org(app: AdminApp) -> str:
    status, doc = await call(app, "POST", "/admin/orgs", {"name": "Acme"})
    assert status == 201
    return doc["org"]["id"]


@pytest_twisted.ensureDeferred
async def test_manager_errors_keep_their_status_and_code(app, vault):
    org_id = await new_org(app)
    path = f"/admin/orgs/{org_id}/provider-keys"
    body = {"provider": "openai", "key": "sk-0123456789abcdef"}
    for error, status, code in (
        (UpstreamUnavailable("OpenAI could not be reached", code="provider_unreachable"), 502,
         "provider_unreachable"),
        (Unprocessable("OpenAI refused the key", code="provider_key_refused"), 422,
         "provider_key_refused"),
        (DatabaseUnavailable("add_provider_key: connection lost"), 503, "database_unavailable"),
    ):  # fmt: skip
        vault.error = error
        assert await call(app, "POST", path, body) == (
            status,
            {"error": {"code": code, "message": _message(error, status)}},
        )


def _message(error: Exception, status: int) -> str:
    return "the database is unavailable; try again" if status == 503 else str(error)


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_are_a_generic_500_with_the_traceback_in_the_log(
    app, vault, logged
):
    org_id = await new_org(app)
    vault.error = RuntimeError("kaboom: lc_00000000-secret-in-a-bug")
    status, doc = await call(app, "GET", f"/admin/orgs/{org_id}/provider-keys")
    assert (status, doc) == (
        500,
        {"error": {"code": "internal_error", "message": "internal error"}},
    )
    failures = [e["log_failure"] for e in logged if "log_failure" in e]
    assert len(failures) == 1
    assert "kaboom" in failures[0].getTraceback()
    assert "list_provider_keys" in formatEvent([e for e in logged if "log_failure" in e][0])


@pytest_twisted.ensureDeferred
async def test_a_missing_manager_is_a_503(database):
    users = UserManager(UserStore(database), MemberStore(database))
    app = AdminApp(
        reactor=reactor,
        database=database,
        metrics=Registry(),
        users=users,
        authenticator=AdminAuthenticator(users=users, admin_token=Secret(TOKEN)),
        orgs=OrgManager(OrgStore(database), ApiKeyStore(database)),
    )
    org_id = await new_org(app)
    status, doc = await call(app, "GET", f"/admin/orgs/{org_id}/providers")
    assert status == 503 and doc["error"]["code"] == "service_unavailable"


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_cancels_its_handler(app, vault, logged):
    org_id = await new_org(app)
    vault.hang = True
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        AdminSite(app.resource())
    )
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/admin/orgs/{org_id}/provider-keys"
        d = treq.post(
            url, json={"provider": "openai", "key": "sk-0123456789"}, headers=AUTH,
            persistent=False,
        )  # fmt: skip
        for _ in range(200):
            if vault.started:
                break
            await deferLater(reactor, 0.01)
        assert vault.started == 1
        d.cancel()  # the client hangs up
        d.addErrback(lambda f: None)
        for _ in range(200):
            if vault.cancelled:
                break
            await deferLater(reactor, 0.01)
        assert vault.cancelled == 1
        assert not [e for e in logged if "log_failure" in e]
    finally:
        await port.stopListening()
