"""Dates at the edges of what can be represented, given to the admin API's
usage endpoints over real HTTP: a clear 400, never a 500 (the windows and
hours computed from a date once overflowed)."""

from __future__ import annotations

import pytest_twisted

from tests.support.admin import AdminClient, start_admin_env


@pytest_twisted.async_yield_fixture
async def env(db_url, tmp_path):
    e = await start_admin_env(db_url, tmp_path)
    yield e
    await e.stop()


def _raw(env, token) -> AdminClient:
    # no OpenAPI checker: a 500 must show up as the assertion below
    return AdminClient(env.admin.base_url, token, None)


def _assert_400(answer) -> None:
    assert answer.status == 400, (answer.status, answer.body)
    assert answer.json["error"]["code"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_usage_until_near_datetime_min_is_400_not_500(env):
    """`until` alone: the default `since` is until - 30 days."""
    alice = _raw(env, env.user("auth0|alice", "alice@example.com").token)
    org = (await alice.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    _assert_400(await alice.get(f"/admin/orgs/{org}/usage?until=0001-01-01T00:00:00Z"))
    _assert_400(await alice.get("/admin/usage?until=0001-01-01T00:00:00Z"))


@pytest_twisted.ensureDeferred
async def test_usage_range_at_datetime_edges_is_400_not_500(env):
    """The hour after 9999-12-31T23:00Z, and a time whose offset lands before
    0001-01-01 UTC."""
    alice = _raw(env, env.user("auth0|alice", "alice@example.com").token)
    org = (await alice.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    _assert_400(
        await alice.get(
            f"/admin/orgs/{org}/usage?since=9999-12-31T22:30:00Z&until=9999-12-31T23:30:00Z"
        )
    )
    _assert_400(
        await alice.get(
            f"/admin/orgs/{org}/usage?since=0001-01-01T00:00:00%2B05:00&until=0001-01-02T00:00:00Z"
        )
    )


@pytest_twisted.ensureDeferred
async def test_dates_inside_the_range_are_still_served(env):
    alice = _raw(env, env.user("auth0|alice", "alice@example.com").token)
    org = (await alice.post("/admin/orgs", {"name": "A"})).json["org"]["id"]
    for query in (
        "since=0002-01-01T00:00:00Z&until=0002-01-02T00:00:00Z",
        "since=9998-12-31T00:00:00Z&until=9998-12-31T23:59:59Z",
        "until=0002-02-01T00:00:00Z",
    ):
        answer = await alice.get(f"/admin/orgs/{org}/usage?{query}")
        assert answer.status == 200, (query, answer.status, answer.body)
