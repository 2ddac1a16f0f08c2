"""The OpenAPI 3.1 document of the admin API, generated from the declared
routes (:class:`lectr.admin.api.Api`), so it cannot drift from what the
Klein app serves."""

from __future__ import annotations

import copy

from lectr import __version__
from lectr.admin.api import Operation
from lectr.managers.users import Permission

_ERRORS = {
    400: ("BadRequest", "The request is malformed: invalid JSON, a wrong type, an unknown field."),
    401: ("Unauthorized", "No token, or an invalid, expired or foreign token."),
    403: ("Forbidden", "The caller's role does not allow this."),
    404: ("NotFound", "No such resource, or it belongs to an org the caller is not in."),
    409: ("Conflict", "The change conflicts with the current state."),
    413: ("PayloadTooLarge", "The request body is too large."),
    422: ("Unprocessable", "The provider refused the key."),
    502: ("UpstreamUnavailable", "The provider could not be reached; nothing was stored."),
    503: ("ServiceUnavailable", "A dependency (database, identity provider) is unavailable."),
}

_PERMISSION_TEXT = {
    Permission.PUBLIC: "No authentication.",
    Permission.AUTHENTICATED: "Any authenticated caller.",
    Permission.GLOBAL_ADMIN: "Global admins only (is_admin users and the admin token).",
    Permission.ORG_READ: "Members of the org with any role (and global admins).",
    Permission.ORG_WRITE: "The org's owners and admins (and global admins).",
    Permission.ORG_OWNER: "The org's owners (and global admins).",
}


def _error_statuses(op: Operation) -> list[int]:
    statuses: set[int] = set(op.errors)
    if op.permission is not Permission.PUBLIC:
        statuses.update((401, 503))
    if op.permission in (Permission.GLOBAL_ADMIN, Permission.ORG_WRITE, Permission.ORG_OWNER):
        statuses.add(403)
    if op.permission.org_scoped or op.path_params:
        statuses.add(404)
    # every route refuses unknown query parameters and unexpected bodies, and
    # the site caps every body
    statuses.update((400, 413))
    return sorted(s for s in statuses if str(s) not in _documented(op))


def _documented(op: Operation) -> set[str]:
    return {str(status) for status in op.responses}


def _response(spec) -> dict:
    """A response's content: a component name, or an inline schema (with
    ``x-content-type`` for something other than JSON)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{spec}"}}}
        }
    schema = copy.deepcopy(spec)
    media = schema.pop("x-content-type", "application/json")
    return {"content": {media: {"schema": schema}}}


_DESCRIPTIONS = {200: "OK", 201: "Created", 204: "No content"}


def _operation(op: Operation) -> dict:
    doc: dict = {
        "operationId": op.name,
        "summary": op.summary,
        "description": (op.description + "\n\n" if op.description else "")
        + f"Access: {_PERMISSION_TEXT[op.permission]}",
        "tags": list(op.tags),
        "responses": {},
    }
    if op.permission is Permission.PUBLIC:
        doc["security"] = []
    params = [
        {"name": name, "in": "path", "required": True, "schema": copy.deepcopy(schema)}
        for name, schema in op.path_params.items()
    ]
    for q in op.query:
        entry = {"name": q.name, "in": "query", "required": False, "schema": dict(q.schema)}
        if q.description:
            entry["description"] = q.description
        params.append(entry)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": copy.deepcopy(op.body)}},
        }
    for status, spec in sorted(op.responses.items()):
        doc["responses"][str(status)] = {
            "description": _DESCRIPTIONS.get(status, "OK"),
            **_response(spec),
        }
    for status in _error_statuses(op):
        name, _ = _ERRORS[status]
        doc["responses"][str(status)] = {"$ref": f"#/components/responses/{name}"}
    return doc


def _provider_enums(node, names: list[str]) -> None:
    """Every field that names a provider of the catalogue (marked
    ``x-lectr-catalogue``) lists the catalogue's names."""
    if isinstance(node, dict):
        if node.pop("x-lectr-catalogue", False):
            node["enum"] = list(names)
        for value in node.values():
            _provider_enums(value, names)
    elif isinstance(node, list):
        for value in node:
            _provider_enums(value, names)


def build_openapi(
    operations: list[Operation], components: dict[str, dict], providers: list[str] | None = None
) -> dict:
    """``providers``: the catalogue's names (default: the built-in ones)."""
    from lectr.admin.schemas import PROVIDERS

    doc = _build(operations, components)
    _provider_enums(doc, providers or list(PROVIDERS))
    return doc


def _build(operations: list[Operation], components: dict[str, dict]) -> dict:
    paths: dict[str, dict] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    error_responses = {
        name: {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for name, text in _ERRORS.values()
    }
    error_responses["Unauthorized"]["headers"] = {
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer challenge"}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Lectr admin API",
            "version": __version__,
            "description": (
                "Administration of a Lectr gateway: organizations, Lectr keys, provider keys "
                "(BYOK), provider policy, request logs and usage. Authenticate with "
                "`Authorization: Bearer <token>`: an OIDC/Auth0 access token (RS256/ES256) or "
                'LECTR_ADMIN_TOKEN. Errors are `{"error": {"code", "message"}}`.'
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "security": [{"bearer": []}],
        "tags": sorted(
            ({"name": t} for t in {t for op in operations for t in op.tags}),
            key=lambda t: t["name"],
        ),
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "OIDC access token (JWT) or LECTR_ADMIN_TOKEN",
                }
            },
            "schemas": copy.deepcopy(components),
            "responses": error_responses,
        },
    }
