"""The OpenAPI document is valid and describes exactly the routes the Klein
app serves (each answer's conformance to it is checked in every admin API
test through tests/support/admin.py)."""

from __future__ import annotations

import json
import re

import pytest_twisted
from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.internet import reactor

from lectr.admin.app import AdminApp
from lectr.admin.auth import AdminAuthenticator
from lectr.managers.users import UserManager
from lectr.metrics import Registry


def klein_routes() -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every rule in the real Klein URL map."""
    routes = set()
    for rule in AdminApp.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((method, path))
    return routes


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}


def test_the_document_is_valid_openapi():
    doc = AdminApp.openapi()
    validate(doc)
    assert doc["openapi"].startswith("3.1")


def test_the_document_matches_the_klein_routes():
    routes = klein_routes()
    assert len(routes) >= 25
    assert documented_routes(AdminApp.openapi()) == routes


def test_every_operation_is_described():
    doc = AdminApp.openapi()
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ids.append(op["operationId"])
            assert op["summary"] and op["tags"], (method, path)
            assert "Access:" in op["description"]
            statuses = set(op["responses"])
            assert any(s.startswith("2") for s in statuses), (method, path)
            if "{org_id}" in path:
                assert {"401", "404"} <= statuses, (method, path)
            for name in re.findall(r"\{(\w+)\}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in op["parameters"])
    assert len(ids) == len(set(ids))


def test_secrets_are_write_only_in_the_document():
    doc = AdminApp.openapi()
    body = doc["paths"]["/admin/orgs/{org_id}/provider-keys"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema["properties"]["key"]["writeOnly"] is True
    provider_key = doc["components"]["schemas"]["ProviderKey"]
    assert "key" not in provider_key["properties"]
    assert provider_key["additionalProperties"] is False


@pytest_twisted.ensureDeferred
async def test_served_document_is_the_generated_one():
    users = UserManager(None, None)
    app = AdminApp(
        reactor=reactor,
        database=None,
        metrics=Registry(),
        users=users,
        authenticator=AdminAuthenticator(users=users),
    )
    client = StubTreq(app.resource())
    response = await client.get("http://admin.test/admin/openapi.json")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
    served = json.loads(await response.content())
    assert served == json.loads(json.dumps(AdminApp.openapi()))
    validate(served)
