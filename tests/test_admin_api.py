"""The admin API over real HTTP on loopback: the whole Lectr service
in-process, a real PostgreSQL, a local OIDC issuer and the fake provider.
Every answer to a documented route is also checked against the OpenAPI
document (tests/support/admin.py)."""

from __future__ import annotations

import json
import uuid

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher

from tests.support.admin import ADMIN_TOKEN, start_admin_env
from tests.support.fake_provider import ANTHROPIC_KEY, OPENAI_KEY


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


@pytest.fixture
def logged():
    """Every log line (formatted, plus the raw fields) while the test runs."""
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) or "")
        lines.append(repr({k: v for k, v in event.items() if not k.startswith("log_")}))
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def sql(db_url: str, query: str, args=()) -> list[tuple]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.commit()
        conn.close()


# --- health ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_readiness_metrics_need_no_auth(env):
    anon = env.client(None)
    assert (await anon.get("/healthz")).json == {"status": "ok"}
    assert (await anon.get("/readyz")).json == {"status": "ready", "database": "ok"}
    await anon.get("/admin/me")
    metrics = await anon.get("/metrics")
    assert metrics.status == 200
    assert metrics.header("content-type").startswith("text/plain")
    assert 'lectr_admin_requests_total{operation="me",status="401"} 1' in metrics.body.decode()


# --- authentication ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_and_bad_credentials_are_401(env):
    for token, code in ((None, "missing_token"), ("wrong-token-0123456789", "invalid_token")):
        answer = await env.client(token).get("/admin/me")
        assert answer.status == 401 and answer.error_code == code
        assert answer.header("www-authenticate").startswith('Bearer realm="lectr"')
    basic = await env.client(None).get("/admin/me", headers={"Authorization": "Basic YTpi"})
    assert basic.status == 401
    huge = await env.client("x" * 9000).get("/admin/me")
    assert huge.status == 401
    expired = env.issuer.token("auth0|late", exp=1_000_000)
    answer = await env.client(expired).get("/admin/orgs")
    assert answer.status == 401 and "expired" in answer.json["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_admin_token_is_a_global_admin(env):
    me = (await env.admin.get("/admin/me")).json
    assert me == {"kind": "token", "is_admin": True, "user": None, "memberships": []}


@pytest_twisted.ensureDeferred
async def test_jwt_identity_is_upserted(env, db_url):
    me = await env.user("auth0|alice", "alice@example.com").get("/admin/me")
    assert me.status == 200
    doc = me.json
    assert doc["kind"] == "user" and doc["is_admin"] is False and doc["memberships"] == []
    assert doc["user"]["subject"] == "auth0|alice"
    assert doc["user"]["email"] == "alice@example.com"
    rows = sql(db_url, "SELECT id, auth0_user_id, email, is_admin FROM user_identities")
    assert rows == [(doc["user"]["id"], "auth0|alice", "alice@example.com", False)]

    # a later token with a new email updates it; one without an email keeps it
    await env.user("auth0|alice", "alice@new.example").get("/admin/me")
    await env.user("auth0|alice").get("/admin/me")
    rows = sql(db_url, "SELECT email FROM user_identities WHERE auth0_user_id = 'auth0|alice'")
    assert rows == [("alice@new.example",)]
    # is_admin is never taken from a token
    await env.client(env.issuer.token("auth0|alice", is_admin=True)).get("/admin/me")
    assert sql(db_url, "SELECT bool_or(is_admin) FROM user_identities") == [(False,)]


# --- organizations and keys --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_org_lifecycle_as_its_owner(env, db_url, logged):
    alice = env.user("auth0|alice", "alice@example.com")
    answer = await alice.post("/admin/orgs", {"name": "  Acme  "})
    assert answer.status == 201
    org, first = answer.json["org"], answer.json["key"]
    assert org["name"] == "Acme" and org["enabled"] is True and org["role"] == "owner"
    assert first["key"].startswith("lc_") and first["prefix"] == first["key"][:11]
    org_id = org["id"]

    listed = (await alice.get("/admin/orgs")).json["items"]
    assert [(o["id"], o["role"]) for o in listed] == [(org_id, "owner")]
    me = (await alice.get("/admin/me")).json
    assert me["memberships"] == [{"org_id": org_id, "org_name": "Acme", "role": "owner"}]

    renamed = await alice.put(f"/admin/orgs/{org_id}", {"name": "Acme Corp"})
    assert renamed.status == 200 and renamed.json["name"] == "Acme Corp"

    off = await alice.put(f"/admin/orgs/{org_id}/enabled", {"enabled": False})
    assert off.json["enabled"] is False
    assert sql(db_url, "SELECT enabled FROM organizations") == [(False,)]
    await alice.put(f"/admin/orgs/{org_id}/enabled", {"enabled": True})

    named = await alice.post(f"/admin/orgs/{org_id}/keys", {"name": "ci"})
    assert named.status == 201 and named.json["name"] == "ci"
    keys = (await alice.get(f"/admin/orgs/{org_id}/keys")).json["items"]
    assert len(keys) == 2 and all("key" not in k for k in keys)
    listing = json.dumps(keys)
    assert first["key"] not in listing and named.json["key"] not in listing

    revoked = await alice.delete(f"/admin/orgs/{org_id}/keys/{named.json['id']}")
    assert revoked.status == 204 and revoked.body == b""
    keys = {k["id"]: k for k in (await alice.get(f"/admin/orgs/{org_id}/keys")).json["items"]}
    assert keys[named.json["id"]]["active"] is False and keys[first["id"]]["active"] is True

    rotated = await alice.post(f"/admin/orgs/{org_id}/rotate-key")
    assert rotated.status == 201 and rotated.json["key"].startswith("lc_")
    keys = (await alice.get(f"/admin/orgs/{org_id}/keys")).json["items"]
    assert [k["id"] for k in keys if k["active"]] == [rotated.json["id"]]

    deleted = await alice.delete(f"/admin/orgs/{org_id}")
    assert deleted.status == 204
    assert (await alice.get(f"/admin/orgs/{org_id}")).status == 404
    assert (await alice.get("/admin/orgs")).json["items"] == []
    assert sql(db_url, "SELECT count(*) FROM org_members") == [(0,)]

    # no key, token or JWT ever reached a log line
    text = "\n".join(logged)
    for secret in (first["key"], named.json["key"], rotated.json["key"], alice.token, ADMIN_TOKEN):
        assert secret not in text
    assert "admin create_org by user:" in text  # but the audit line did


@pytest_twisted.ensureDeferred
async def test_global_admin_sees_every_org_and_orgs_made_by_the_token_have_no_owner(env):
    made = await env.admin.post("/admin/orgs", {"name": "Ops", "key_name": "bootstrap"})
    assert made.status == 201 and made.json["org"]["role"] is None
    assert made.json["key"]["name"] == "bootstrap"
    await env.user("auth0|bob").post("/admin/orgs", {"name": "Bob's"})
    names = sorted(o["name"] for o in (await env.admin.get("/admin/orgs")).json["items"])
    assert names == ["Bob's", "Ops"]
    assert (await env.user("auth0|carol").get("/admin/orgs")).json["items"] == []


@pytest_twisted.ensureDeferred
async def test_granting_global_admin_rights(env):
    carol = env.user("auth0|carol", "carol@example.com")
    carol_id = (await carol.get("/admin/me")).json["user"]["id"]
    await env.user("auth0|bob").post("/admin/orgs", {"name": "Bob's"})
    assert (await carol.get("/admin/orgs")).json["items"] == []
    assert (await carol.get("/admin/users")).status == 403

    granted = await env.admin.put(f"/admin/users/{carol_id}", {"is_admin": True})
    assert granted.status == 200 and granted.json["is_admin"] is True
    assert [o["name"] for o in (await carol.get("/admin/orgs")).json["items"]] == ["Bob's"]
    users = (await carol.get("/admin/users")).json["items"]
    assert {u["subject"] for u in users} == {"auth0|carol", "auth0|bob"}
    assert (await env.admin.put(f"/admin/users/{uuid.uuid4()}", {"is_admin": True})).status == 404


@pytest_twisted.ensureDeferred
async def test_every_identity_is_listed_however_many(env, db_url):
    """The list is not cut at some count (it once stopped at 1,000 without
    saying so): a global admin looking for an identity must find it."""
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO user_identities (auth0_user_id) "
                "SELECT 'oidc|user-' || n FROM generate_series(1, 1500) AS n"
            )
    finally:
        conn.close()
    users = (await env.admin.get("/admin/users")).json["items"]
    subjects = {u["subject"] for u in users}
    assert {f"oidc|user-{n}" for n in range(1, 1501)} <= subjects


# --- request validation -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_json_bodies_are_validated(env):
    admin = env.admin
    cases = [
        ({"name": "x", "color": "red"}, "unknown field 'color'"),
        ({"name": 42}, "name must be a string"),
        ({"name": "x" * 201}, "at most 200 characters"),
        ({"name": ""}, "must not be empty"),
        ({}, "name is required"),
        (["name"], "must be an object"),
        ({"name": "   "}, "1 to 200 characters"),
        ({"name": "a\x01b"}, "control characters"),
    ]
    for body, message in cases:
        answer = await admin.post("/admin/orgs", body)
        assert answer.status == 400, body
        assert answer.error_code == "bad_request"
        assert message in answer.json["error"]["message"], (body, answer.json)
    # what is not text at all (tests/test_admin_text.py covers every route)
    for body, message in (
        ({"name": "a\x00b"}, "name is not valid text: it contains a NUL character (U+0000)"),
        ({"name": "a\ud800"}, "name is not valid text: it contains an unpaired surrogate (U+D800)"),
    ):
        answer = await admin.post("/admin/orgs", body)
        assert (answer.status, answer.error_code) == (400, "invalid_text")
        assert answer.json["error"]["message"] == message

    for raw in (b"{", b"{'name': 'x'}", b'{"name": NaN}', b"\xff\xfe", b'{"name": "x"} x'):
        answer = await admin.post("/admin/orgs", raw=raw)
        assert (answer.status, answer.error_code) == (400, "malformed_json"), raw

    assert (await admin.post("/admin/orgs")).status == 400  # no body at all
    org = (await admin.post("/admin/orgs", {"name": "A"})).json["org"]
    enabled = await admin.put(f"/admin/orgs/{org['id']}/enabled", {"enabled": "false"})
    assert enabled.status == 400 and "true or false" in enabled.json["error"]["message"]
    # endpoints without a body refuse one
    answer = await admin.call("DELETE", f"/admin/orgs/{org['id']}", raw=b'{"force": true}')
    assert answer.status == 400
    # a body over the cap: 413 before it is read
    big = await admin.post("/admin/orgs", raw=b'{"name": "' + b"x" * (2 << 20) + b'"}')
    assert big.status == 413 and big.error_code == "payload_too_large"
    # query strings are validated too
    assert (await admin.get("/admin/orgs", params={"color": "red"})).status == 400


@pytest_twisted.ensureDeferred
async def test_a_body_of_too_many_values_is_413_before_it_is_parsed(env):
    """Parsing an admin body is the reactor's time, the proxy's too: a route
    explanation (any member may ask for one) of 1 MiB of small values cost
    50-110 ms of one turn. Refused on its commas, counted first."""
    admin = env.admin
    org = (await admin.post("/admin/orgs", {"name": "Dense"})).json["org"]
    path = f"/admin/orgs/{org['id']}/routes/explain"
    dense = b'{"body": {"model": "gpt-4o-mini", "x": [' + b"0," * 60_000 + b"0]}}"
    assert len(dense) < 1 << 20
    answer = await admin.post(path, raw=dense)
    assert (answer.status, answer.error_code) == (413, "too_many_values")
    assert answer.json["error"]["message"] == (
        "the request body holds more than 50000 commas: the admin API takes smaller JSON documents"
    )
    # a real request, however long its prose, is explained
    prose = "A long prompt, with commas, clauses, and more clauses. " * 4000
    body = {"body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prose}]}}
    answer = await admin.post(path, body)
    assert answer.status == 200, answer.json
    assert answer.json["model"] == "gpt-4o-mini"


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods(env):
    answer = await env.admin.get("/admin/nothing-here")
    assert answer.status == 404 and answer.error_code == "not_found"
    answer = await env.admin.call("PATCH", "/admin/orgs")
    assert answer.status == 405 and answer.error_code == "method_not_allowed"
    assert answer.header("allow") == "GET, POST"
    assert (await env.admin.get("/admin/orgs/not-a-uuid")).status == 404
    assert (await env.admin.get(f"/admin/orgs/{uuid.uuid4()}")).status == 404


# --- members -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_members_and_the_last_owner(env):
    alice = env.user("auth0|alice", "alice@example.com")
    bob = env.user("auth0|bob", "bob@example.com")
    bob_id = (await bob.get("/admin/me")).json["user"]["id"]
    alice_id = (await alice.get("/admin/me")).json["user"]["id"]
    org_id = (await alice.post("/admin/orgs", {"name": "Acme"})).json["org"]["id"]
    members = f"/admin/orgs/{org_id}/members"

    added = await alice.post(members, {"email": "BOB@example.com", "role": "member"})
    assert added.status == 201 and added.json["user_id"] == bob_id
    assert added.json["role"] == "member"
    assert (await bob.get(f"/admin/orgs/{org_id}")).json["role"] == "member"
    # members and admins may not manage members
    assert (await bob.get(members)).status == 403

    pre = await alice.post(members, {"subject": "auth0|dave", "role": "admin"})
    assert pre.status == 201 and pre.json["email"] is None  # provisioned before first sign-in
    dave = env.user("auth0|dave", "dave@example.com")
    assert (await dave.get(f"/admin/orgs/{org_id}")).json["role"] == "admin"
    assert (await dave.post(members, {"user_id": bob_id, "role": "owner"})).status == 403

    changed = await alice.post(members, {"user_id": bob_id, "role": "admin"})
    assert changed.status == 200 and changed.json["role"] == "admin"

    # the last owner can be neither demoted nor removed
    demote = await alice.post(members, {"user_id": alice_id, "role": "admin"})
    assert demote.status == 409 and demote.error_code == "last_owner"
    remove = await alice.delete(f"{members}/{alice_id}")
    assert remove.status == 409 and remove.error_code == "last_owner"
    # with a second owner, both work
    assert (await alice.post(members, {"user_id": bob_id, "role": "owner"})).status == 200
    assert (await alice.post(members, {"user_id": alice_id, "role": "member"})).status == 200
    assert (await bob.delete(f"{members}/{alice_id}")).status == 204
    assert (await alice.get(f"/admin/orgs/{org_id}")).status == 404  # no longer a member
    assert (await bob.delete(f"{members}/{alice_id}")).status == 404
    listed = (await bob.get(members)).json["items"]
    assert sorted((m["subject"], m["role"]) for m in listed) == [
        ("auth0|bob", "owner"),
        ("auth0|dave", "admin"),
    ]

    # naming the user: exactly one way, and it must exist
    assert (await bob.post(members, {"role": "member"})).status == 400
    both = {"user_id": bob_id, "subject": "auth0|bob", "role": "member"}
    assert (await bob.post(members, both)).status == 400
    nobody = await bob.post(members, {"email": "nobody@example.com", "role": "member"})
    assert nobody.status == 404
    assert (await bob.post(members, {"user_id": str(uuid.uuid4()), "role": "member"})).status == 404
    assert (await bob.post(members, {"subject": "auth0|x", "role": "boss"})).status == 400


@pytest_twisted.ensureDeferred
async def test_ambiguous_email_is_a_conflict(env):
    await env.user("auth0|a1", "same@example.com").get("/admin/me")
    await env.user("google|a2", "same@example.com").get("/admin/me")
    org_id = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    answer = await env.admin.post(
        f"/admin/orgs/{org_id}/members", {"email": "same@example.com", "role": "member"}
    )
    assert (answer.status, answer.error_code) == (409, "ambiguous_email")


@pytest_twisted.ensureDeferred
async def test_only_a_verified_email_names_a_member(env, db_url):
    """Anyone can sign up with someone else's address, unverified: such an
    identity must never be the one added by that address."""
    org_id = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    members = f"/admin/orgs/{org_id}/members"
    victim_email = {"email": "Victim@Example.com", "role": "admin"}

    # the impostor signs in first, with the victim's address, unverified
    impostor = env.user("github|impostor", "victim@example.com", verified=False)
    me = (await impostor.get("/admin/me")).json["user"]
    assert (me["email"], me["email_verified"]) == ("victim@example.com", False)
    refused = await env.admin.post(members, victim_email)
    assert (refused.status, refused.error_code) == (409, "email_not_verified")
    assert "not verified" in refused.json["error"]["message"]
    assert (await impostor.get(f"/admin/orgs/{org_id}")).status == 404  # not a member

    # the victim signs in with a verified address: the address now names them
    victim = env.user("auth0|victim", "victim@example.com")
    victim_id = (await victim.get("/admin/me")).json["user"]["id"]
    added = await env.admin.post(members, victim_email)
    assert (added.status, added.json["user_id"]) == (201, victim_id)
    assert (await impostor.get(f"/admin/orgs/{org_id}")).status == 404

    # a token without an email keeps the stored pair; a new unverified email clears the flag
    await env.user("auth0|victim").get("/admin/me")
    flag = "SELECT email, email_verified FROM user_identities WHERE auth0_user_id = %s"
    assert sql(db_url, flag, ("auth0|victim",)) == [("victim@example.com", True)]
    await env.user("auth0|victim", "victim@example.com", verified=False).get("/admin/me")
    assert sql(db_url, flag, ("auth0|victim",)) == [("victim@example.com", False)]
    again = await env.admin.post(members, {**victim_email, "role": "member"})
    assert (again.status, again.error_code) == (409, "email_not_verified")
    # naming by subject or id still works
    by_id = await env.admin.post(members, {"user_id": victim_id, "role": "member"})
    assert by_id.status == 200
    # an address nobody signed in with is still 404
    nobody = await env.admin.post(members, {"email": "nobody@example.com", "role": "member"})
    assert (nobody.status, nobody.error_code) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_org_names_are_unique_whatever_their_case(env):
    admin = env.admin
    first = await admin.post("/admin/orgs", {"name": "Acme"})
    assert first.status == 201
    for clash in ("Acme", "acme", "  ACME  ", "aCmE"):
        answer = await admin.post("/admin/orgs", {"name": clash})
        assert (answer.status, answer.error_code) == (409, "name_taken"), clash
        assert "already exists" in answer.json["error"]["message"]
    other = (await admin.post("/admin/orgs", {"name": "Other"})).json["org"]["id"]
    renamed = await admin.put(f"/admin/orgs/{other}", {"name": "ACME"})
    assert (renamed.status, renamed.error_code) == (409, "name_taken")
    # an org may change the case of its own name
    acme = first.json["org"]["id"]
    assert (await admin.put(f"/admin/orgs/{acme}", {"name": "ACME"})).json["name"] == "ACME"
    # a freed name can be taken again
    assert (await admin.delete(f"/admin/orgs/{acme}")).status == 204
    assert (await admin.put(f"/admin/orgs/{other}", {"name": "acme"})).status == 200
    names = sorted(o["name"] for o in (await admin.get("/admin/orgs")).json["items"])
    assert names == ["acme"]


@pytest_twisted.ensureDeferred
async def test_concurrent_creations_of_one_name_make_one_org(env):
    answers = await DeferredList(
        [ensureDeferred(env.admin.post("/admin/orgs", {"name": "Race"})) for _ in range(8)],
        consumeErrors=True,
    )
    statuses = sorted(answer.status for ok, answer in answers if ok)
    assert statuses == [201] + [409] * 7


# --- provider keys and settings ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provider_keys_never_come_back(env, logged):
    org_id = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    path = f"/admin/orgs/{org_id}/provider-keys"
    added = await env.admin.post(path, {"provider": "openai", "key": OPENAI_KEY, "name": "main"})
    assert added.status == 201, added.json
    assert added.json["last4"] == OPENAI_KEY[-4:] and added.json["provider"] == "openai"
    await env.admin.post(path, {"provider": "anthropic", "key": ANTHROPIC_KEY})

    refused = await env.admin.post(path, {"provider": "openai", "key": "sk-wrong-0123456789"})
    assert refused.status == 422
    assert "sk-wrong-0123456789" not in refused.body.decode()

    listed = await env.admin.get(path)
    assert sorted(k["provider"] for k in listed.json["items"]) == ["anthropic", "openai"]
    for answer in (added, listed):
        assert OPENAI_KEY not in answer.body.decode()
        assert ANTHROPIC_KEY not in answer.body.decode()

    assert (await env.admin.post(path, {"provider": "nope", "key": "x" * 20})).status == 400
    assert (await env.admin.post(path, {"provider": "openai", "key": "short"})).status == 400

    gone = await env.admin.delete(f"{path}/{added.json['id']}")
    assert gone.status == 204
    assert [k["provider"] for k in (await env.admin.get(path)).json["items"]] == ["anthropic"]
    assert (await env.admin.delete(f"{path}/{added.json['id']}")).status == 404
    text = "\n".join(logged)
    assert OPENAI_KEY not in text and ANTHROPIC_KEY not in text and "sk-wrong" not in text


@pytest_twisted.ensureDeferred
async def test_provider_settings(env):
    org_id = (await env.admin.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    listed = (await env.admin.get(f"/admin/orgs/{org_id}/providers")).json["items"]
    assert [(p["provider"], p["enabled"], p["updated_at"]) for p in listed] == [
        (name, True, None) for name in env.components.providers.names()
    ]
    assert [p["provider"] for p in listed][:2] == ["openai", "anthropic"]
    path = f"/admin/orgs/{org_id}/providers/openai"
    updated = await env.admin.put(path, {"allowed_models": ["gpt-4o-mini", "gpt-4.1*"]})
    assert updated.status == 200
    assert updated.json["allowed_models"] == ["gpt-4o-mini", "gpt-4.1*"]
    assert updated.json["enabled"] is True and updated.json["updated_at"] is not None
    off = await env.admin.put(path, {"enabled": False})
    assert off.json["enabled"] is False and off.json["allowed_models"] == [
        "gpt-4o-mini",
        "gpt-4.1*",
    ]
    # the proxy's in-memory copy follows
    settings = env.components.settings.get(org_id, "openai")
    assert settings.enabled is False and settings.allows_model("gpt-4.1-nano")

    assert (await env.admin.put(path, {})).status == 400  # nothing to change
    assert (await env.admin.put(path, {"allowed_models": "gpt-4o"})).status == 400
    assert (await env.admin.put(path, {"allowed_models": ["a*b"]})).status == 400
    assert (
        await env.admin.put(f"/admin/orgs/{org_id}/providers/nope", {"enabled": True})
    ).status == 404
