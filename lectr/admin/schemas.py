"""The admin API's JSON shapes: request bodies (validated by
:mod:`lectr.admin.validation`) and response components (shown in the OpenAPI
document and checked against real responses by the tests)."""

from __future__ import annotations

from lectr.admin.validation import QueryParam
from lectr.managers.users import ROLES
from lectr.providers.anthropic import Anthropic
from lectr.providers.openai import OpenAI

PROVIDERS = (OpenAI.name, Anthropic.name)
MAX_PAGE = 200
DEFAULT_PAGE = 50


def obj(properties: dict, required: tuple[str, ...] = (), **extra) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def string(max_len: int = 200, min_len: int = 1, **extra) -> dict:
    return {"type": "string", "minLength": min_len, "maxLength": max_len, **extra}


def nullable(schema: dict) -> dict:
    kind = schema["type"]
    return {**schema, "type": [kind, "null"] if isinstance(kind, str) else [*kind, "null"]}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def items_of(name: str) -> dict:
    return obj({"items": {"type": "array", "items": ref(name)}}, ("items",))


NAME = string(200, description="1 to 200 characters, trimmed; no control characters")
MODEL_PATTERNS = {
    "type": "array",
    "maxItems": 500,
    "items": string(200),
    "description": "exact model names or 'prefix*' patterns (case-insensitive)",
}
UUID = {"type": "string", "format": "uuid"}
TIMESTAMP = {"type": "string", "format": "date-time"}

# --- request bodies -------------------------------------------------------------

CREATE_ORG = obj({"name": NAME, "key_name": NAME}, ("name",))
RENAME_ORG = obj({"name": NAME}, ("name",))
SET_ENABLED = obj({"enabled": {"type": "boolean"}}, ("enabled",))
NEW_KEY = obj({"name": NAME})
ADD_PROVIDER_KEY = obj(
    {
        "provider": {"type": "string", "enum": list(PROVIDERS)},
        "key": string(1024, 8, writeOnly=True, description="the provider's API key"),
        "name": NAME,
    },
    ("provider", "key"),
)
UPDATE_PROVIDER = obj(
    {
        "enabled": {"type": "boolean"},
        "allowed_models": MODEL_PATTERNS,
        "blocked_models": MODEL_PATTERNS,
    },
    minProperties=1,
)
PUT_MEMBER = obj(
    {
        "user_id": {**UUID, "description": "an identity's id"},
        "email": string(320, format="email", description="of a user who has signed in"),
        "subject": string(255, description="OIDC subject (sub); created if never seen"),
        "role": {"type": "string", "enum": list(ROLES)},
    },
    ("role",),
)
SET_USER = obj({"is_admin": {"type": "boolean"}}, ("is_admin",))

RATE = {
    "type": ["number", "string"],
    "maxLength": 32,
    "description": "USD per million tokens, at most 6 decimals (a decimal string keeps it exact)",
}
_RATES = {
    "input": {**RATE, "description": "prompt tokens not read from or written to a cache"},
    "output": {**RATE, "description": "completion tokens, reasoning included"},
    "cached_input": {**RATE, "description": "prompt tokens read from the cache (absent: input)"},
    "cache_write_5m": {**RATE, "description": "prompt tokens written to the cache, 5-minute TTL"},
    "cache_write_1h": {**RATE, "description": "prompt tokens written to the cache, 1-hour TTL"},
}
LONG_CONTEXT = obj(
    {
        "threshold": {
            "type": "integer",
            "minimum": 1,
            "description": "a prompt over this many tokens prices the whole request at these rates",
        },
        **_RATES,
    },
    ("threshold", "input", "output"),
)
SET_PRICE = obj(
    {
        "provider": string(64, description="a provider name (built-in or custom)"),
        "model": string(256, description="the model name (snapshots resolve to it)"),
        **_RATES,
        "long_context": LONG_CONTEXT,
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "checked": {"type": "string", "maxLength": 10, "description": "YYYY-MM-DD"},
        "note": string(500, 0),
    },
    ("provider", "model", "input", "output", "checked"),
)

# --- query parameters -------------------------------------------------------------

LIMIT = QueryParam(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
    f"page size; values outside 1..{MAX_PAGE} are clamped",
    clamp=True,
)
PROVIDER_FILTER = QueryParam("provider", {"type": "string", "enum": list(PROVIDERS)})
SINCE = QueryParam("since", {"type": "string", "format": "date-time"}, "inclusive; ISO 8601")
UNTIL = QueryParam("until", {"type": "string", "format": "date-time"}, "exclusive; ISO 8601")
MODEL_FILTER = QueryParam("model", string(256), "exact model name")
STATUS_FILTER = QueryParam(
    "status",
    string(5, pattern=r"^([1-5][0-9][0-9]|[1-5]xx|error)$"),
    "a status (429), a class (4xx), or 'error' (every status from 400)",
)
CURSOR = QueryParam("cursor", string(64), "next_cursor of the previous page (same filters)")
GROUP_BY_VALUES = ["model", "provider", "key", "day", "hour"]
GROUP_BY = QueryParam(
    "group_by",
    {"type": "string", "enum": GROUP_BY_VALUES, "default": "model"},
    "what the totals are grouped by: model, provider, Lectr key, UTC day or hour",
)
USAGE_SINCE = QueryParam(
    "since",
    {"type": "string", "format": "date-time"},
    "inclusive, rounded down to the hour; default: 30 days before until",
)
USAGE_UNTIL = QueryParam(
    "until",
    {"type": "string", "format": "date-time"},
    "exclusive, rounded up to the hour; default: now",
)
PRICE_PROVIDER = QueryParam("provider", string(64), "a provider name")
PRICE_MODEL = QueryParam(
    "model", string(256), "a model name: the one entry that prices it (needs provider)"
)
PRICE_PROVIDER_REQUIRED = QueryParam("provider", string(64), "the provider of the override")
PRICE_MODEL_REQUIRED = QueryParam("model", string(256), "the model of the override")

# --- response components ------------------------------------------------------------

COMPONENTS: dict[str, dict] = {
    "Error": obj(
        {
            "error": obj(
                {"code": {"type": "string"}, "message": {"type": "string"}}, ("code", "message")
            )
        },
        ("error",),
    ),
    "Health": obj({"status": {"type": "string"}}, ("status",)),
    "Ready": obj({"status": {"type": "string"}, "database": {"type": "string"}}, ("status",)),
    "Org": obj(
        {
            "id": UUID,
            "name": {"type": "string"},
            "enabled": {"type": "boolean"},
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
            "role": {
                "type": ["string", "null"],
                "enum": [*ROLES, None],
                "description": "the caller's role; null for a global admin who is not a member",
            },
        },
        ("id", "name", "enabled", "created_at", "updated_at", "role"),
    ),
    "ApiKey": obj(
        {
            "id": UUID,
            "org_id": UUID,
            "name": {"type": "string"},
            "prefix": {"type": "string", "description": "the first characters, for recognition"},
            "active": {"type": "boolean"},
            "created_at": TIMESTAMP,
            "revoked_at": nullable(TIMESTAMP),
        },
        ("id", "org_id", "name", "prefix", "active", "created_at", "revoked_at"),
    ),
    "IssuedKey": obj(
        {
            "id": UUID,
            "org_id": UUID,
            "name": {"type": "string"},
            "prefix": {"type": "string"},
            "active": {"type": "boolean"},
            "created_at": TIMESTAMP,
            "revoked_at": nullable(TIMESTAMP),
            "key": {
                "type": "string",
                "description": "the Lectr key (lc_…): shown this once, never again",
            },
        },
        ("id", "org_id", "name", "prefix", "active", "created_at", "revoked_at", "key"),
    ),
    "CreatedOrg": obj({"org": ref("Org"), "key": ref("IssuedKey")}, ("org", "key")),
    "User": obj(
        {
            "id": UUID,
            "subject": {"type": "string", "description": "the OIDC subject (sub)"},
            "email": {"type": ["string", "null"]},
            "is_admin": {"type": "boolean"},
            "created_at": TIMESTAMP,
            "last_seen_at": nullable(TIMESTAMP),
        },
        ("id", "subject", "email", "is_admin", "created_at", "last_seen_at"),
    ),
    "Membership": obj(
        {"org_id": UUID, "org_name": {"type": "string"}, "role": {"enum": list(ROLES)}},
        ("org_id", "org_name", "role"),
    ),
    "Me": obj(
        {
            "kind": {"type": "string", "enum": ["user", "token"]},
            "is_admin": {"type": "boolean"},
            "user": {"oneOf": [ref("User"), {"type": "null"}]},
            "memberships": {"type": "array", "items": ref("Membership")},
        },
        ("kind", "is_admin", "user", "memberships"),
    ),
    "Member": obj(
        {
            "org_id": UUID,
            "user_id": UUID,
            "role": {"type": "string", "enum": list(ROLES)},
            "subject": {"type": "string"},
            "email": {"type": ["string", "null"]},
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
        },
        ("org_id", "user_id", "role", "subject", "email", "created_at", "updated_at"),
    ),
    "ProviderKey": obj(
        {
            "id": UUID,
            "org_id": UUID,
            "provider": {"type": "string", "enum": list(PROVIDERS)},
            "name": {"type": "string"},
            "last4": {"type": "string", "description": "the key's last four characters"},
            "enabled": {"type": "boolean"},
            "created_at": TIMESTAMP,
        },
        ("id", "org_id", "provider", "name", "last4", "enabled", "created_at"),
    ),
    "ProviderSettings": obj(
        {
            "org_id": UUID,
            "provider": {"type": "string", "enum": list(PROVIDERS)},
            "enabled": {"type": "boolean"},
            "allowed_models": {"type": "array", "items": {"type": "string"}},
            "blocked_models": {"type": "array", "items": {"type": "string"}},
            "updated_at": {
                **nullable(TIMESTAMP),
                "description": "null while the defaults apply (nothing stored)",
            },
        },
        ("org_id", "provider", "enabled", "allowed_models", "blocked_models", "updated_at"),
    ),
    "RotationStatus": obj(
        {
            "current_kek": {"type": "string", "description": "fingerprint of ENCRYPTION_KEY"},
            "next_kek": {
                "type": ["string", "null"],
                "description": "fingerprint of ENCRYPTION_KEY_NEW, when set",
            },
            "rows_by_kek": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "provider keys wrapped by each master key",
            },
            "done": {"type": "boolean"},
        },
        ("current_kek", "next_kek", "rows_by_kek", "done"),
    ),
}

_TOKENS = {"type": ["integer", "null"]}
COMPONENTS["RequestLog"] = obj(
    {
        "request_id": UUID,
        "created_at": TIMESTAMP,
        "key_id": {"type": ["string", "null"], "format": "uuid"},
        "provider": {"type": "string"},
        "model": {"type": ["string", "null"]},
        "method": {"type": "string"},
        "path": {"type": "string", "description": "provider path, without the query string"},
        "status": {"type": "integer", "description": "sent to the client; 499: it went away"},
        "latency_ms": {"type": "number"},
        "ttfb_ms": {"type": ["number", "null"]},
        "streamed": {"type": "boolean"},
        "prompt_tokens": _TOKENS,
        "completion_tokens": _TOKENS,
        "total_tokens": _TOKENS,
        "cached_tokens": _TOKENS,
        "cache_creation_tokens": _TOKENS,
        "usage_source": {"type": "string", "enum": ["provider", "estimated", "none"]},
        "error_type": {"type": ["string", "null"]},
        "reasoning_tokens": {**_TOKENS, "description": "of completion_tokens"},
        "cache_creation_1h_tokens": {
            **_TOKENS,
            "description": "of cache_creation_tokens: written with the 1-hour TTL",
        },
        "response_model": {
            "type": ["string", "null"],
            "description": "the model the provider says it served",
        },
        "cost_usd": {
            "type": ["string", "null"],
            "description": "exact decimal USD; null: unpriced (no usage, or no price)",
        },
    },
    REQUEST_FIELDS := (
        "request_id",
        "created_at",
        "key_id",
        "provider",
        "model",
        "method",
        "path",
        "status",
        "latency_ms",
        "ttfb_ms",
        "streamed",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "cache_creation_tokens",
        "usage_source",
        "error_type",
        "reasoning_tokens",
        "cache_creation_1h_tokens",
        "response_model",
        "cost_usd",
    ),
)
COMPONENTS["RequestPage"] = obj(
    {
        "items": {"type": "array", "items": ref("RequestLog")},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "pass as cursor for the next (older) page; null: no more",
        },
    },
    ("items", "next_cursor"),
)
_COUNT = {"type": "integer", "minimum": 0}
COMPONENTS["UsageTotal"] = obj(
    {
        "key": {
            "type": ["string", "null"],
            "description": (
                "the model (null: requests without one), the provider, the Lectr key id "
                "(null: requests without one), the UTC day (YYYY-MM-DD) or the hour (ISO 8601)"
            ),
        },
        "requests": _COUNT,
        "errors": {**_COUNT, "description": "status 400 and above"},
        "unmetered": {**_COUNT, "description": "requests whose usage is unknown"},
        "estimated": {**_COUNT, "description": "requests whose usage is estimated (cut short)"},
        "unpriced": {**_COUNT, "description": "metered requests without a price"},
        "prompt_tokens": _COUNT,
        "completion_tokens": _COUNT,
        "total_tokens": _COUNT,
        "cached_tokens": {**_COUNT, "description": "prompt tokens read from the cache"},
        "cache_creation_tokens": {**_COUNT, "description": "prompt tokens written to the cache"},
        "cache_creation_1h_tokens": _COUNT,
        "reasoning_tokens": _COUNT,
        "cache_hits": {**_COUNT, "description": "requests that read from the cache"},
        "cache_hit_rate": {
            "type": ["number", "null"],
            "description": "cached_tokens / prompt_tokens",
        },
        "cost_usd": {"type": "string", "description": "exact decimal USD (priced requests)"},
    },
    USAGE_FIELDS := (
        "key",
        "requests",
        "errors",
        "unmetered",
        "estimated",
        "unpriced",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "cache_creation_tokens",
        "cache_creation_1h_tokens",
        "reasoning_tokens",
        "cache_hits",
        "cache_hit_rate",
        "cost_usd",
    ),
)
COMPONENTS["UsageReport"] = obj(
    {
        "since": {**TIMESTAMP, "description": "the start of the first hour covered"},
        "until": {**TIMESTAMP, "description": "the end of the last hour covered"},
        "group_by": {"type": "string", "enum": GROUP_BY_VALUES},
        "items": {"type": "array", "items": ref("UsageTotal")},
    },
    ("since", "until", "group_by", "items"),
)

_RATE_OUT = {"type": ["string", "null"], "description": "USD per million tokens"}
_PRICE_RATES = {k: _RATE_OUT for k in _RATES}
_PRICE_FIELDS = (
    "provider",
    "model",
    "source",
    *_RATES,
    "long_context",
    "max_output_tokens",
    "checked",
    "note",
)
_PRICE = {
    "provider": {"type": "string"},
    "model": {"type": "string"},
    "source": {"type": "string", "enum": ["catalogue", "override"]},
    **_PRICE_RATES,
    "long_context": {
        "type": ["object", "null"],
        "description": "threshold (prompt tokens) and the rates past it",
    },
    "max_output_tokens": {"type": ["integer", "null"]},
    "checked": {"type": "string", "format": "date"},
    "note": {"type": ["string", "null"]},
}
COMPONENTS["CataloguePrice"] = obj(_PRICE, _PRICE_FIELDS)
COMPONENTS["Price"] = obj(
    {
        **_PRICE,
        "catalogue": {
            "oneOf": [ref("CataloguePrice"), {"type": "null"}],
            "description": "the shipped entry an override replaces",
        },
        "updated_at": {**nullable(TIMESTAMP), "description": "when the override was set"},
    },
    (*_PRICE_FIELDS, "catalogue", "updated_at"),
)
COMPONENTS["CostLine"] = obj(
    {
        "kind": {
            "type": "string",
            "enum": ["input", "cached_input", "cache_write_5m", "cache_write_1h", "output"],
        },
        "tokens": _COUNT,
        "usd_per_million": {"type": "string"},
        "cost_usd": {"type": "string", "description": "tokens x rate / 1,000,000"},
    },
    ("kind", "tokens", "usd_per_million", "cost_usd"),
)
COMPONENTS["CostExplanation"] = obj(
    {
        "request": ref("RequestLog"),
        "usage_raw": {
            "type": ["string", "null"],
            "description": "the provider's usage object as received (at most 4 KiB)",
        },
        "pricing": {
            "type": ["object", "null"],
            "description": "the prices used: provider, model, source, checked, tier, rates",
        },
        "lines": {"type": "array", "items": ref("CostLine")},
        "total_usd": {"type": ["string", "null"]},
        "matches": {
            "type": ["boolean", "null"],
            "description": "the stored cost equals the sum of the lines",
        },
        "estimated": {"type": "boolean"},
        "note": {"type": "string"},
    },
    ("request", "usage_raw", "pricing", "lines", "total_usd", "matches", "estimated", "note"),
)

# lists
for _name in ("Org", "ApiKey", "User", "Member", "ProviderKey", "ProviderSettings", "Price"):
    COMPONENTS[f"{_name}List"] = items_of(_name)
