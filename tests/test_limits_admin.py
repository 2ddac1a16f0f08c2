"""Limits through the admin API and the CLI, over real HTTP against the
whole Lectr service (answers checked against the OpenAPI document), and the
validation of hostile limit values as a class (hypothesis)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from lectr.admin.schemas import PUT_LIMITS
from lectr.admin.validation import validate
from lectr.errors import BadRequest
from lectr.limits import Admission, Refusal
from lectr.limits.model import FIELDS, clean_changes
from tests.support.admin import ADMIN_TOKEN, start_admin_env
from tests.support.process import REPO, base_env


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


async def new_org(env, name: str = "Acme") -> tuple[str, str]:
    created = await env.admin.post("/admin/orgs", {"name": name})
    assert created.status == 201
    return created.json["org"]["id"], created.json["key"]["id"]


@pytest_twisted.ensureDeferred
async def test_set_read_and_remove_limits_of_an_org_and_a_key(env):
    org_id, key_id = await new_org(env)
    empty = await env.admin.get(f"/admin/orgs/{org_id}/limits")
    assert empty.status == 200
    assert empty.json == {
        "org_id": org_id,
        "key_id": None,
        "rpm": None,
        "tpm": None,
        "max_concurrent": None,
        "usd_per_day": None,
        "usd_per_month": None,
        "updated_at": None,
        "usage": {
            "requests_this_minute": 0,
            "tokens_this_minute": 0,
            "usd_today": "0.00",
            "usd_this_month": "0.00",
            "concurrent": 0,
        },
    }
    put = await env.admin.put(
        f"/admin/orgs/{org_id}/limits", {"rpm": 100, "usd_per_day": 12.5, "usd_per_month": "300"}
    )
    assert put.status == 200, put.body
    assert (put.json["rpm"], put.json["usd_per_day"], put.json["usd_per_month"]) == (
        100,
        "12.50",
        "300.00",
    )
    assert put.json["updated_at"] is not None
    # fields left out keep their values; null removes one
    put = await env.admin.put(f"/admin/orgs/{org_id}/limits", {"tpm": 50_000, "rpm": None})
    assert (put.json["rpm"], put.json["tpm"], put.json["usd_per_day"]) == (None, 50_000, "12.50")
    # the proxy's admission step of this node follows at once
    limits = env.components.limits
    a = limits.admit(org_id, key_id, reserve_usd=Decimal("12.50"))
    assert isinstance(a, Admission)
    assert dict(a.headers)[b"x-ratelimit-limit-tokens"] == b"50000"
    r = limits.admit(org_id, key_id, reserve_usd=Decimal("0.01"))
    assert isinstance(r, Refusal) and r.limit == "usd_per_day"
    a.settle(tokens=10, cost_usd=Decimal("0.5"))

    key = await env.admin.put(
        f"/admin/orgs/{org_id}/keys/{key_id}/limits", {"max_concurrent": 2, "usd_per_day": 1}
    )
    assert key.status == 200
    assert (key.json["key_id"], key.json["max_concurrent"], key.json["usd_per_day"]) == (
        key_id,
        2,
        "1.00",
    )
    read = await env.admin.get(f"/admin/orgs/{org_id}/keys/{key_id}/limits")
    assert read.json["max_concurrent"] == 2 and read.json["rpm"] is None
    # the org's limits are separate from the key's
    assert (await env.admin.get(f"/admin/orgs/{org_id}/limits")).json["max_concurrent"] is None

    cleared = await env.admin.put(
        f"/admin/orgs/{org_id}/keys/{key_id}/limits",
        {"max_concurrent": None, "usd_per_day": None},
    )
    assert cleared.json["updated_at"] is None
    rows = await env.components.database.runQuery(
        "t", "SELECT count(*) FROM limits WHERE scope_id = %s", (key_id,)
    )
    assert rows[0][0] == 0


@pytest_twisted.ensureDeferred
async def test_keys_of_other_orgs_and_malformed_ids_are_not_found(env):
    org_id, key_id = await new_org(env)
    other_org, other_key = await new_org(env, "Other")
    for path in (
        f"/admin/orgs/{org_id}/keys/{other_key}/limits",
        f"/admin/orgs/{org_id}/keys/{uuid.uuid4()}/limits",
        f"/admin/orgs/{org_id}/keys/not-a-uuid/limits",
        f"/admin/orgs/{uuid.uuid4()}/limits",
    ):
        for answer in (
            await env.admin.get(path),
            await env.admin.put(path, {"rpm": 5}),
        ):
            assert answer.status == 404, (path, answer.body)
            assert answer.error_code == "not_found"
    assert (await env.admin.get(f"/admin/orgs/{other_org}/keys/{other_key}/limits")).status == 200


@pytest.mark.parametrize(
    "body,message",
    [
        ({}, "the body must set at least 1 field(s)"),
        ({"rpm": 0}, "rpm must be at least 1"),
        ({"rpm": -5}, "rpm must be at least 1"),
        ({"rpm": 1.5}, "rpm must be a whole number or null"),
        ({"rpm": True}, "rpm must be a whole number or null"),
        ({"rpm": "100"}, "rpm must be a whole number or null"),
        ({"max_concurrent": 10**7}, "max_concurrent must be at most 1000000"),
        ({"usd_per_day": 0}, "usd_per_day must be at least 1e-06"),
        ({"usd_per_day": -1}, "usd_per_day must be at least 1e-06"),
        ({"usd_per_day": "1.0000001"}, "usd_per_day is malformed"),
        ({"usd_per_day": "ten"}, "usd_per_day is malformed"),
        ({"usd_per_day": 0.0000001}, "usd_per_day must be at least 1e-06"),
        ({"usd_per_month": 1e12}, "usd_per_month must be at most 1000000000"),
        ({"usd_per_month": [1]}, "usd_per_month must be a number or a string or null"),
        ({"rpm": 5, "burst": 1}, "unknown field 'burst'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_limits_are_400_with_a_clear_message(env, body, message):
    org_id, _ = await new_org(env)
    answer = await env.admin.put(f"/admin/orgs/{org_id}/limits", body)
    assert answer.status == 400, answer.body
    assert answer.json["error"]["message"] == message


# --- hostile values as a class -------------------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.from_regex(r"\A-?[0-9]{0,12}(\.[0-9]{0,8})?\Z"),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_bodies = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), _values, max_size=6
)


@settings(max_examples=500, deadline=None)
@given(_bodies)
def test_any_body_is_either_refused_cleanly_or_stored_as_valid_limits(body):
    """What the server does with a body (the route's schema, then the
    manager): a BadRequest with a short message, or well-formed limits.
    Nothing else escapes (no 500)."""
    try:
        validate(body, PUT_LIMITS)
        cleaned = clean_changes(body)
    except BadRequest as e:
        assert e.message and len(e.message) < 200
        return
    assert set(cleaned) == set(body) <= set(FIELDS)
    for name, value in cleaned.items():
        if value is None:
            continue
        if name.startswith("usd"):
            assert isinstance(value, Decimal) and value.is_finite() and 0 < value <= 10**9
            assert value == value.quantize(Decimal("0.000001"))
        else:
            assert type(value) is int and 1 <= value


_valid_usd = st.decimals(
    min_value=Decimal("0.000001"), max_value=Decimal(10**9), places=6, allow_nan=False
)
_valid = st.fixed_dictionaries(
    {},
    optional={
        "rpm": st.integers(1, 10**9) | st.none(),
        "tpm": st.integers(1, 10**12) | st.none(),
        "max_concurrent": st.integers(1, 10**6) | st.none(),
        "usd_per_day": _valid_usd.map(str) | st.none(),
        "usd_per_month": _valid_usd.map(str) | st.none(),
    },
).filter(bool)


@settings(max_examples=300, deadline=None)
@given(_valid)
def test_every_valid_body_is_accepted_as_given(body):
    validate(body, PUT_LIMITS)
    cleaned = clean_changes(body)
    for name, value in body.items():
        expected = Decimal(value) if isinstance(value, str) else value
        assert cleaned[name] == expected


# --- the CLI ---------------------------------------------------------------------------------


def cli(admin_url: str, *args: str) -> subprocess.CompletedProcess:
    env = base_env(LECTR_ADMIN_URL=admin_url, LECTR_ADMIN_TOKEN=ADMIN_TOKEN)
    return subprocess.run(
        [sys.executable, "-c", "from lectr.cli import main; main()", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest_twisted.ensureDeferred
async def test_cli_sets_shows_and_clears_limits(env):
    from tests.support.lectr_service import admin_url

    url = admin_url(env.service)
    org_id, key_id = await new_org(env, "Initech")

    async def run(*args: str) -> subprocess.CompletedProcess:
        return await deferToThread(cli, url, *args)

    out = await run("limits", "set", "Initech", "--rpm", "120", "--usd-per-day", "$25.5")
    assert out.returncode == 0, out.stderr
    assert "requests/min   120  (0 this minute)" in out.stdout
    assert "USD per day    25.50  (0.00 today (UTC))" in out.stdout

    out = await run("limits", "set", "Initech", "--key", "default", "--concurrent", "3", "--json")
    doc = json.loads(out.stdout)
    assert (doc["key_id"], doc["max_concurrent"]) == (key_id, 3)

    out = await run("limits", "show", org_id, "--json")
    assert json.loads(out.stdout)["rpm"] == 120
    out = await run("limits", "set", "Initech", "--rpm", "none")
    assert "requests/min   none" in out.stdout

    out = await run("limits", "clear", "Initech", "--key", key_id)
    assert out.returncode == 0 and "(no limits)" in out.stdout

    # mistakes are one line and an exit status
    nothing = await run("limits", "set", "Initech")
    assert nothing.returncode == 2 and nothing.stderr.startswith("lectr: nothing to change")
    bad = await run("limits", "set", "Initech", "--rpm", "0")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
    missing = await run("limits", "show", "Initech", "--key", "nope")
    assert missing.returncode == 1 and "no active key named 'nope'" in missing.stderr


@pytest_twisted.ensureDeferred
async def test_the_service_wires_the_webhook_and_the_settings(db_url, tmp_path):
    from lectr.limits.alerts import AlertWebhook

    e = await start_admin_env(
        db_url,
        tmp_path,
        LECTR_ALERT_WEBHOOK_URL="http://127.0.0.1:9/hook?token=t",
        LECTR_ALERT_WEBHOOK_SECRET="whsec-0123456789abcdef",
        LECTR_LIMITS_FAIL_CLOSED="1",
        LECTR_LIMITS_LEASE_FRACTION="0.25",
    )
    try:
        limits = e.components.limits
        assert isinstance(limits._webhook, AlertWebhook)
        assert limits.limiter.fail_closed is True and limits.limiter.fraction == 0.25
        metrics = (await e.client(None).get("/metrics")).body.decode()
        assert "lectr_limits_offline 0" in metrics
    finally:
        await e.stop()
