"""A small async client for the admin API in tests (treq over real HTTP),
and a checker that validates answers against the OpenAPI document."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import treq
from openapi_schema_validator import OAS31Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Answer:
    status: int
    body: bytes
    headers: Any

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None

    @property
    def error_code(self) -> str | None:
        doc = self.json
        return doc["error"]["code"] if isinstance(doc, dict) and "error" in doc else None


class AdminClient:
    """Every answer to a documented route is checked against the OpenAPI
    document (status documented, body matching its schema) when a checker
    is given."""

    def __init__(
        self, base_url: str, token: str | None = ADMIN_TOKEN, checker: OpenAPIChecker | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.checker = checker

    def as_(self, token: str | None) -> AdminClient:
        return AdminClient(self.base_url, token, self.checker)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict | None = None,
    ) -> Answer:
        hdrs = {}
        if self.token is not None:
            hdrs["Authorization"] = f"Bearer {self.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        response = await treq.request(
            method,
            self.base_url + path,
            headers={k: [v] for k, v in hdrs.items()},
            data=data,
            params=params,
            persistent=False,
        )
        content = await response.content()
        answer = Answer(response.code, content, response.headers)
        if self.checker is not None:
            self.checker.check_path(method, path, answer)
        return answer

    async def get(self, path: str, **kw) -> Answer:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw) -> Answer:
        return await self.call("POST", path, body, **kw)

    async def put(self, path: str, body: Any = None, **kw) -> Answer:
        return await self.call("PUT", path, body, **kw)

    async def delete(self, path: str, **kw) -> Answer:
        return await self.call("DELETE", path, **kw)


class OpenAPIChecker:
    """Validates a response body against the schema the OpenAPI document
    declares for (method, path template, status)."""

    def __init__(self, document: dict, live=None) -> None:
        """``live``: a function returning the document the server would serve
        now (its provider enums follow the catalogue, custom providers
        included); checked before each use."""
        self._live = live
        self._load(document)

    def _load(self, document: dict) -> None:
        self.document = document
        self._registry = Registry().with_resource(
            "urn:lectr-admin", DRAFT202012.create_resource(document)
        )

    def refresh(self) -> None:
        if self._live is not None:
            document = self._live()
            if document != self.document:
                self._load(document)

    def _response(self, method: str, template: str, status: int) -> tuple[str, dict]:
        op = self.document["paths"][template][method.lower()]
        response = op["responses"].get(str(status))
        assert response is not None, f"{method} {template} does not document status {status}"
        pointer = f"/paths/{_escape(template)}/{method.lower()}/responses/{status}"
        if "$ref" in response:
            pointer = response["$ref"].removeprefix("#")
            name = pointer.rsplit("/", 1)[1]
            response = self.document["components"]["responses"][name]
        return pointer, response

    def template_for(self, method: str, path: str) -> str | None:
        """The documented path template matching a concrete path."""
        path = path.split("?", 1)[0]
        for template, ops in self.document["paths"].items():
            if method.lower() not in ops:
                continue
            pattern = "^" + re.sub(r"\\{\w+\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path):
                return template
        return None

    def check_path(self, method: str, path: str, answer: Answer) -> None:
        self.refresh()
        template = self.template_for(method, path)
        if template is not None and method != "HEAD":
            self.check(method, template, answer)

    def check(self, method: str, template: str, answer: Answer) -> None:
        pointer, response = self._response(method, template, answer.status)
        content = response.get("content")
        if not content:
            assert answer.body == b"", f"{method} {template}: expected no body"
            return
        media = next(iter(content))
        ctype = answer.header("content-type") or ""
        assert ctype.startswith(media.split(";")[0]), (method, template, ctype)
        if not media.startswith("application/json"):
            return
        schema = {"$ref": f"urn:lectr-admin#{pointer}/content/{_escape(media)}/schema"}
        OAS31Validator(schema, registry=self._registry).validate(answer.json)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


@dataclass
class AdminEnv:
    """A running Lectr (in-process) with a fake provider and a local OIDC
    issuer; ``admin`` calls with the admin token, ``user(sub)`` with a JWT."""

    service: Any
    fake: Any
    issuer: Any
    admin: AdminClient

    @property
    def components(self):
        return self.service.components

    def client(self, token: str | None) -> AdminClient:
        return self.admin.as_(token)

    def user(self, sub: str, email: str | None = None, *, verified: bool = True) -> AdminClient:
        """A caller with a JWT; an ``email`` comes with ``email_verified:
        true`` unless ``verified`` is False."""
        claims = {"email": email}
        if email is not None:
            claims["email_verified"] = verified
        return self.admin.as_(self.issuer.token(sub, **claims))

    async def stop(self) -> None:
        await self.service.stopService()
        await self.fake.stop()
        await self.issuer.stop()


async def start_admin_env(db_url: str, tmp_path, **env: str) -> AdminEnv:
    from lectr.admin.app import AdminApp
    from tests.support.fake_provider import FakeProviderServer
    from tests.support.lectr_service import admin_url, start_lectr
    from tests.support.oidc import LocalIssuer

    fake = await FakeProviderServer.start()
    issuer = await LocalIssuer.start()
    try:
        service = await start_lectr(db_url, tmp_path, fake, **{**issuer.env(), **env})
    except BaseException:
        await fake.stop()
        await issuer.stop()
        raise
    registry = service.components.providers
    checker = OpenAPIChecker(AdminApp.openapi(), live=lambda: AdminApp.openapi(registry.names()))
    return AdminEnv(service, fake, issuer, AdminClient(admin_url(service), ADMIN_TOKEN, checker))
