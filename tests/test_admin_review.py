"""Defects found reviewing the admin API, each pinned by a test that failed
before its fix: the app over real HTTP on a real database (the whole Lectr
service in-process, tests/support/admin.py), or the validator directly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import psycopg2
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from lectr.admin import schemas as s
from lectr.admin.app import AdminApp
from lectr.admin.validation import validate
from lectr.errors import BadRequest
from lectr.managers.users import clean_subject
from lectr.storage.request_logs import RequestLogStore
from tests.support.admin import start_admin_env
from tests.test_admin_matrix import logged_request


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


async def new_org(env, name: str = "Acme") -> str:
    answer = await env.admin.post("/admin/orgs", {"name": name})
    assert answer.status == 201
    return answer.json["org"]["id"]


# --- custom providers ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_creations_of_one_custom_provider_make_one_and_refuse_the_rest(env):
    """POST /admin/providers is 409 when the name is taken: checked against
    the node's in-memory copy, concurrent POSTs (or a POST on a node whose
    copy lags) all answered 201, each silently replacing the one before."""
    bodies = [
        {"name": "vllm", "dialect": "openai", "base_url": f"http://10.0.0.{i}:8000"}
        for i in range(1, 6)
    ]
    answers = await gatherResults(
        [ensureDeferred(env.admin.post("/admin/providers", b)) for b in bodies]
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [201, 409, 409, 409, 409]
    winner = next(a for a in answers if a.status == 201).json
    for loser in (a for a in answers if a.status == 409):
        assert loser.error_code == "conflict"
    listed = (await env.admin.get("/admin/providers")).json["items"]
    (stored,) = [p for p in listed if p["name"] == "vllm"]
    assert stored["base_url"] == winner["base_url"]


def test_the_openapi_document_lets_put_create_a_provider_not_in_the_catalogue():
    """PUT /admin/providers/{name} creates a provider (201): its path
    parameter cannot be limited to the providers that already exist (nor
    list built-in names, which it refuses)."""
    doc = AdminApp.openapi(["openai", "anthropic", "vllm"])
    (param,) = doc["paths"]["/admin/providers/{name}"]["put"]["parameters"]
    checker = Draft202012Validator(param["schema"])
    assert checker.is_valid("ollama-gpu")  # a new one: 201
    assert checker.is_valid("vllm")  # an existing one: 200
    assert not checker.is_valid("Not A Name")


# --- patterns: JSON Schema's $ is the end of the input --------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"\A[0-9]{1,9}(\.[0-9]{1,6})?\Z"),
    st.sampled_from(["\n", "\r\n"]),
)
def test_a_pattern_refuses_a_trailing_newline(amount, newline):
    """The schemas' patterns end with $, which in JSON Schema (ECMA-262)
    matches only at the end of the input; Python's re also matches before a
    final newline, so "5\\n" passed a pattern the OpenAPI document says it
    fails."""
    schema = s.PUT_LIMITS
    validate({"usd_per_day": amount}, schema)  # the value itself is fine
    with pytest.raises(BadRequest):
        validate({"usd_per_day": amount + newline}, schema)
    with pytest.raises(BadRequest):
        validate("429" + newline, s.STATUS_FILTER.schema)
    with pytest.raises(BadRequest):
        validate("openai" + newline, s.PROVIDER_NAME)


@pytest_twisted.ensureDeferred
async def test_a_budget_with_a_trailing_newline_is_refused(env):
    org = await new_org(env)
    answer = await env.admin.put(f"/admin/orgs/{org}/limits", {"usd_per_day": "5\n"})
    assert answer.status == 400 and answer.error_code == "bad_request"
    answer = await env.admin.get(f"/admin/orgs/{org}/requests", params={"status": "429\n"})
    assert answer.status == 400


# --- usage ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_usage_per_org_answers_the_range_it_covered(env):
    """Like an org's usage, GET /admin/usage reads whole hours: its answer
    said since=10:30 and until=11:15 while its totals covered 10:00 to
    12:00."""
    org = await new_org(env)
    rng = {"since": "2026-01-01T10:30:00Z", "until": "2026-01-01T11:15:00Z"}
    per_org = (await env.admin.get(f"/admin/orgs/{org}/usage", params=rng)).json
    everyone = (await env.admin.get("/admin/usage", params=rng)).json
    covered = ("2026-01-01T10:00:00+00:00", "2026-01-01T12:00:00+00:00")
    assert (per_org["since"], per_org["until"]) == covered
    assert (everyone["since"], everyone["until"]) == covered
    default = (await env.admin.get("/admin/usage")).json
    since, until = (datetime.fromisoformat(default[k]) for k in ("since", "until"))
    assert since.minute == since.second == until.minute == until.second == 0


def test_the_default_usage_range_ends_after_now_even_on_the_hour():
    """The default until was now rounded up to the hour: exactly on an hour
    that is now itself, so the range ended at the instant it was asked (and
    a since of that hour, a month's start, was refused as not earlier)."""
    for offset in (0.0, 0.000001, 1.0, 3599.999):
        clock = task.Clock()
        clock.advance(1796083200.0 + offset)  # 2026-12-01T00:00:00Z and after
        since, until = AdminApp._usage_range(SimpleNamespace(_reactor=clock), {})
        now = datetime.fromtimestamp(clock.seconds(), UTC)
        assert until == datetime(2026, 12, 1, 1, tzinfo=UTC) > now, offset
        assert until - since == timedelta(days=30)
        since, until = AdminApp._usage_range(
            SimpleNamespace(_reactor=clock), {"since": datetime(2026, 12, 1, tzinfo=UTC)}
        )
        assert since < until


# --- members -----------------------------------------------------------------------------


def test_a_subject_with_a_delete_character_is_refused():
    """A token whose sub holds DEL (U+007F) is refused, so an identity
    created for such a subject could never sign in: naming it is a 400, not
    a membership nobody can use."""
    with pytest.raises(BadRequest):
        clean_subject("auth0|a\x7fb")
    assert clean_subject(" auth0|ab ") == "auth0|ab"


@pytest_twisted.ensureDeferred
async def test_adding_a_member_by_an_impossible_subject_is_a_400(env):
    org = await new_org(env)
    answer = await env.admin.post(
        f"/admin/orgs/{org}/members", {"role": "member", "subject": "auth0|a\x7fb"}
    )
    assert answer.status == 400
    members = (await env.admin.get(f"/admin/orgs/{org}/members")).json["items"]
    assert members == []


# --- one request's cost: 404 for anyone else, the same 404 --------------------------------


_record = logged_request  # one logged request of an org


@pytest_twisted.ensureDeferred
async def test_another_orgs_request_is_indistinguishable_from_no_request(env):
    """GET /admin/requests/{id}: "for anyone else the request does not
    exist". It answered 404 "organization not found" for a request of an
    org the caller is not in, and "request not found" for an unknown id:
    whoever held an id learnt that the request exists."""
    org = await new_org(env)
    row = _record(org)
    assert await RequestLogStore(env.components.database).insert([row]) == 1
    assert (await env.admin.get(f"/admin/requests/{row.request_id}")).status == 200
    stranger = env.user("auth0|stranger", "stranger@example.com")
    await stranger.post("/admin/orgs", {"name": "Stranger's"})  # a member elsewhere
    theirs = await stranger.get(f"/admin/requests/{row.request_id}")
    unknown = await stranger.get(f"/admin/requests/{uuid.uuid4()}")
    assert theirs.status == unknown.status == 404
    assert theirs.json == unknown.json


# --- identities from tokens: a claim PostgreSQL cannot store ------------------------------


@pytest.mark.parametrize(
    "email",
    ["a\x00b@example.com", "a\ud800b@example.com", "a\x01b@example.com", "ab@exa\x7fmple.com"],
)
@pytest_twisted.ensureDeferred
async def test_a_token_with_an_unstorable_email_still_signs_in(env, email):
    """The email claim comes from the user's profile at the issuer. One
    holding a NUL or an unpaired surrogate (JSON's "\\ud800") reached
    PostgreSQL and every call of that user was a 500; like any unusable
    email claim, it is ignored."""
    answer = await env.user("auth0|odd", email).get("/admin/me")
    assert answer.status == 200, answer.body
    assert answer.json["user"]["email"] is None
    assert answer.json["user"]["email_verified"] is False


@pytest.mark.parametrize("sub", ["auth0|a\ud800b", "auth0|\udfff"])
@pytest_twisted.ensureDeferred
async def test_a_token_whose_subject_is_not_text_is_refused(env, sub):
    """A sub with an unpaired surrogate is no identity PostgreSQL can store:
    a 401 invalid_token, not a 500."""
    answer = await env.client(env.issuer.token(sub)).get("/admin/me")
    assert answer.status == 401 and answer.error_code == "invalid_token"


# --- routes: the OpenAPI document states the bounds the server applies ----------------------


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6)))
def test_the_documented_attempt_timeout_is_the_one_accepted(timeout):
    """attempt_timeout is 0.1 to 3600 seconds (docs/admin-api.md); the
    OpenAPI schema said any number, so a client checking its request
    against the document sent 0 or 7200 and got a 400."""
    schema = s.PUT_ROUTE["properties"]["attempt_timeout"]
    documented = Draft202012Validator(schema).is_valid(timeout)
    assert documented == (0.1 <= timeout <= 3600)
    body = {"targets": [{"provider": "openai", "model": "m"}], "attempt_timeout": timeout}
    if documented:
        validate(body, s.PUT_ROUTE)
    else:
        with pytest.raises(BadRequest):
            validate(body, s.PUT_ROUTE)


# --- found, not fixed: the live cursor passes rows committed out of id order ----------------


@pytest_twisted.ensureDeferred
async def test_a_live_view_sees_a_row_committed_after_a_newer_one(env, db_url):
    org = await new_org(env)
    path = f"/admin/orgs/{org}/requests"
    start = (await env.admin.get(path)).json["live_cursor"]
    early, late = _record(org), _record(org)
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:  # ids allocated now, committed later
            cur.execute(
                "INSERT INTO request_logs (request_id, created_at, org_id, provider, method, "
                "path, status, latency_ms) VALUES (%s, %s, %s, 'openai', 'POST', "
                "'/v1/chat/completions', 200, 1.0)",
                (early.request_id, early.created_at, org),
            )
        assert await RequestLogStore(env.components.database).insert([late]) == 1
        first = (await env.admin.get(path, params={"after": start})).json
        assert [r["request_id"] for r in first["items"]] == [late.request_id]
        conn.commit()
    finally:
        conn.close()
    second = (await env.admin.get(path, params={"after": first["live_cursor"]})).json
    assert early.request_id in [r["request_id"] for r in second["items"]]


# --- a custom provider deleted while a key or route for it is being added ------------------


async def while_vllm_is_deleted(db_url: str, write):
    """``write()`` (a store's coroutine) begun while another transaction
    has deleted the custom provider "vllm" and commits 0.3 s later: the
    write's Deferred, to await once the delete is committed."""
    deleting = psycopg2.connect(db_url)
    try:
        deleting.cursor().execute("DELETE FROM custom_providers WHERE name = 'vllm'")
        writing = ensureDeferred(write())
        await deferLater(reactor, 0.3)
        deleting.commit()
    finally:
        deleting.close()
    return writing


async def org_and_vllm(env) -> str:
    """A new org's id, once the custom provider "vllm" exists."""
    org = await new_org(env)
    made = await env.admin.post(
        "/admin/providers",
        {"name": "vllm", "dialect": "openai", "base_url": "http://10.0.0.1:8000"},
    )
    assert made.status == 201
    return org


def _sealed_key_row(cur, org_id: str, provider: str) -> None:
    cur.execute(
        "INSERT INTO provider_keys (id, org_id, provider, name, last4, ciphertext, nonce, "
        "wrapped_dek, dek_nonce, kek_id) VALUES (%s, %s, %s, 'k', 'abcd', %s, %s, %s, %s, 'f')",
        (str(uuid.uuid4()), org_id, provider, b"c", b"n" * 12, b"w", b"d" * 12),
    )


@pytest_twisted.ensureDeferred
async def test_a_custom_provider_is_not_deleted_under_a_key_being_added(env, db_url):
    """The delete checked "no key uses it", then deleted: a key stored in
    between (its check with the provider takes up to 10 s) was left for a
    provider that no longer existed. A key being added holds the provider's
    row (FOR KEY SHARE): the delete waits for it, then sees the key: 409."""
    org = await org_and_vllm(env)
    adding = psycopg2.connect(db_url)
    try:
        cur = adding.cursor()
        cur.execute("SELECT 1 FROM custom_providers WHERE name = 'vllm' FOR KEY SHARE")
        deleting = ensureDeferred(env.admin.delete("/admin/providers/vllm"))
        await deferLater(reactor, 0.3)
        _sealed_key_row(cur, org, "vllm")
        adding.commit()
    finally:
        adding.close()
    answer = await deleting
    assert answer.status == 409, answer.json
    listed = (await env.admin.get("/admin/providers")).json["items"]
    assert "vllm" in [p["name"] for p in listed]


@pytest_twisted.ensureDeferred
async def test_a_key_for_a_custom_provider_deleted_meanwhile_is_not_stored(env, db_url):
    """The other order: the provider is deleted while its key is being
    added: the key's insert waits for the delete, then finds no provider."""
    from lectr.storage.custom_providers import ProviderGone
    from lectr.storage.provider_keys import NewProviderKey, ProviderKeyStore

    org = await org_and_vllm(env)
    store = ProviderKeyStore(env.components.database)
    new = NewProviderKey(
        id=str(uuid.uuid4()),
        org_id=org,
        provider="vllm",
        name="k",
        last4="abcd",
        ciphertext=b"c",
        nonce=b"n" * 12,
        wrapped_dek=b"w",
        dek_nonce=b"d" * 12,
        kek_id="f",
    )
    inserting = await while_vllm_is_deleted(db_url, lambda: store.insert(new, custom=True))
    with pytest.raises(ProviderGone):
        await inserting
    check = psycopg2.connect(db_url)
    try:
        cur = check.cursor()
        cur.execute("SELECT count(*) FROM provider_keys WHERE provider = 'vllm'")
        assert cur.fetchone()[0] == 0
    finally:
        check.close()


@pytest_twisted.ensureDeferred
async def test_a_route_to_a_custom_provider_deleted_meanwhile_is_not_stored(env, db_url):
    from lectr.storage.custom_providers import ProviderGone
    from lectr.storage.routes import RouteStore

    org = await org_and_vllm(env)
    store = RouteStore(env.components.database)
    upserting = await while_vllm_is_deleted(
        db_url,
        lambda: store.upsert(
            org,
            "smart",
            targets=[{"provider": "vllm", "model": "m", "weight": 1}],
            strategy="fallback",
            retry_on=["5xx"],
            max_attempts=3,
            attempt_timeout=None,
            custom=["vllm"],
        ),
    )
    with pytest.raises(ProviderGone):
        await upserting
    assert (await env.admin.get(f"/admin/orgs/{org}/routes")).json["items"] == []
