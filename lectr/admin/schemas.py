"""The admin API's JSON shapes: request bodies (validated by
:mod:`lectr.admin.validation`) and response components (shown in the OpenAPI
document and checked against real responses by the tests)."""

from __future__ import annotations

from lectr.admin.validation import QueryParam
from lectr.managers.users import ROLES
from lectr.providers.registry import NAME_RE, discover

#: the built-in providers (custom ones are added by global admins at run time:
#: the OpenAPI document lists the live catalogue in every PROVIDER field)
PROVIDERS = tuple(cls.name for cls in discover())
PROVIDER_PATTERN = f"^{NAME_RE.pattern}$"
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
#: a provider's name (a route prefix)
PROVIDER_NAME = {
    "type": "string",
    "pattern": PROVIDER_PATTERN,
    "description": "lower-case letters, digits and '-', starting with a letter",
}
#: a provider of the catalogue: the OpenAPI document lists the live catalogue
#: here (the annotation marks where; see lectr/admin/openapi.py)
PROVIDER = {
    "type": "string",
    "pattern": PROVIDER_PATTERN,
    "description": "a provider of the catalogue (GET /admin/providers)",
    "x-lectr-catalogue": True,
}
ROUTE_NAME = string(256, description="the name clients send as model; no '/'")
MODEL = string(256, description="printable ASCII")
TIMESTAMP = {"type": "string", "format": "date-time"}

# --- request bodies -------------------------------------------------------------

CREATE_ORG = obj({"name": NAME, "key_name": NAME}, ("name",))
RENAME_ORG = obj({"name": NAME}, ("name",))
SET_ENABLED = obj({"enabled": {"type": "boolean"}}, ("enabled",))
NEW_KEY = obj({"name": NAME})
WEIGHT = {"type": "integer", "minimum": 1, "maximum": 1000}
ADD_PROVIDER_KEY = obj(
    {
        "provider": PROVIDER,
        "key": string(1024, 8, writeOnly=True, description="the provider's API key"),
        "name": NAME,
        "weight": {**WEIGHT, "description": "share of the pool's requests (default 1)"},
        "base_url": string(
            2048,
            description="the key's own endpoint, for providers whose keys name one (Azure: "
            "https://<resource>.openai.azure.com)",
        ),
        "api_version": string(40, description="Azure api-version (default 2024-10-21)"),
    },
    ("provider", "key"),
)
UPDATE_PROVIDER_KEY = obj(
    {"enabled": {"type": "boolean"}, "weight": WEIGHT, "name": NAME}, minProperties=1
)
_CUSTOM_PROVIDER_FIELDS = {
    "display_name": NAME,
    "dialect": {"type": "string", "enum": ["openai", "anthropic"]},
    "base_url": string(2048, description="origin (and path prefix) before /v1; http(s)"),
    "auth": {"type": "string", "enum": ["bearer", "x-api-key", "api-key"], "default": "bearer"},
    "models_path": string(200, description="the path key validation asks (default /v1/models)"),
}
CUSTOM_PROVIDER = obj(
    {"name": PROVIDER_NAME, **_CUSTOM_PROVIDER_FIELDS}, ("name", "dialect", "base_url")
)
CUSTOM_PROVIDER_UPDATE = obj(_CUSTOM_PROVIDER_FIELDS, ("dialect", "base_url"))
ROUTE_TARGET = obj({"provider": PROVIDER, "model": MODEL, "weight": WEIGHT}, ("provider", "model"))
RETRY_ON = {
    "type": "array",
    "maxItems": 16,
    "items": {"type": "string", "enum": ["429", "5xx", "timeout", "connect"]},
}
PUT_ROUTE = obj(
    {
        "targets": {"type": "array", "minItems": 1, "maxItems": 10, "items": ROUTE_TARGET},
        "strategy": {"type": "string", "enum": ["fallback", "weighted"], "default": "fallback"},
        "retry_on": {**RETRY_ON, "description": "default: all four"},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
        "attempt_timeout": {
            "type": ["number", "null"],
            "minimum": 0.1,
            "maximum": 3600,
            "description": "seconds to wait for each attempt's response headers (0.1 to 3600)",
        },
    },
    ("targets",),
)
EXPLAIN = obj(
    {
        "path": string(2048, description="proxy path (default /v1/chat/completions)"),
        "headers": {
            "type": "object",
            "maxProperties": 1000,
            "description": "request headers (e.g. x-lectr-session); at most 1,000",
        },
        "body": {"type": "object", "description": "the JSON request body"},
    },
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
        "email": string(
            320,
            format="email",
            description=(
                "of a user who has signed in with a token saying email_verified: true "
                "(409 email_not_verified otherwise)"
            ),
        ),
        "subject": string(255, description="OIDC subject (sub); created if never seen"),
        "role": {"type": "string", "enum": list(ROLES)},
    },
    ("role",),
)
SET_USER = obj({"is_admin": {"type": "boolean"}}, ("is_admin",))


def _count_limit(maximum: int, what: str) -> dict:
    return {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": maximum,
        "description": f"{what}; null: no limit",
    }


def _usd_limit(what: str) -> dict:
    return {
        "type": ["number", "string", "null"],
        "minimum": 0.000001,
        "maximum": 1_000_000_000,
        "pattern": r"^[0-9]{1,10}(\.[0-9]{1,6})?$",
        "description": f"{what}: USD, a number or a decimal string (at most 6 decimals); "
        "null: no budget",
    }


PUT_LIMITS = obj(
    {
        "rpm": _count_limit(1_000_000_000, "requests per UTC minute"),
        "tpm": _count_limit(1_000_000_000_000, "tokens (input + output) per UTC minute"),
        "max_concurrent": _count_limit(1_000_000, "requests in flight at once"),
        "usd_per_day": _usd_limit("spend per UTC day"),
        "usd_per_month": _usd_limit("spend per calendar month (UTC)"),
    },
    minProperties=1,
)
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
#: the rates of one service tier (a cache rate not given: this tier's input rate)
TIER_PRICE = obj(
    {
        **_RATES,
        "long_context": {
            **LONG_CONTEXT,
            "description": "this tier's own long context (the base one does not apply)",
        },
    },
    ("input", "output"),
)
WEB_SEARCH_RATE = {
    "type": ["number", "string"],
    "maxLength": 32,
    "description": "USD per 1,000 server-side web searches, at most 6 decimals",
}
SET_PRICE = obj(
    {
        "provider": string(64, description="a provider name (built-in or custom)"),
        "model": string(256, description="the model name (snapshots resolve to it)"),
        **_RATES,
        "long_context": LONG_CONTEXT,
        "tiers": {
            "type": "object",
            "description": (
                "service tier name (as the provider reports it: 1 to 32 of a-z, 0-9, '_', "
                "'-'; at most 16) -> its rates: a request served at that tier is priced whole "
                "at them; any other tier at the base rates"
            ),
            "additionalProperties": TIER_PRICE,
        },
        "web_search": WEB_SEARCH_RATE,
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
PROVIDER_FILTER = QueryParam("provider", PROVIDER)
SINCE = QueryParam("since", {"type": "string", "format": "date-time"}, "inclusive; ISO 8601")
UNTIL = QueryParam("until", {"type": "string", "format": "date-time"}, "exclusive; ISO 8601")
MODEL_FILTER = QueryParam("model", string(256), "exact model name")
STATUS_FILTER = QueryParam(
    "status",
    string(5, pattern=r"^([1-5][0-9][0-9]|[1-5]xx|error)$"),
    "a status (429), a class (4xx), or 'error' (every status from 400)",
)
KEY_FILTER = QueryParam("key_id", {**UUID}, "a Lectr key's id")
CURSOR = QueryParam("cursor", string(64), "next_cursor of the previous page (same filters)")
AFTER = QueryParam(
    "after",
    string(2048),  # (a PostgreSQL snapshot or two: lectr.managers.usage.LiveCursor)
    "live_cursor of a previous answer (same filters): the requests stored since, in commit order",
)
GROUP_BY_VALUES = ["model", "provider", "key", "day", "hour"]
GROUP_BY = QueryParam(
    "group_by",
    {"type": "string", "enum": GROUP_BY_VALUES, "default": "model"},
    "what the totals are grouped by: model, provider, Lectr key id, UTC day or UTC hour "
    "(hourly ranges: at most 31 days)",
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
            "email_verified": {
                "type": "boolean",
                "description": (
                    "the token that supplied the email said email_verified: true; only such "
                    "users can be added as members by email"
                ),
            },
            "is_admin": {"type": "boolean"},
            "created_at": TIMESTAMP,
            "last_seen_at": nullable(TIMESTAMP),
        },
        ("id", "subject", "email", "email_verified", "is_admin", "created_at", "last_seen_at"),
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
            "provider": PROVIDER,
            "name": {"type": "string"},
            "last4": {"type": "string", "description": "the key's last four characters"},
            "enabled": {"type": "boolean"},
            "weight": {"type": "integer"},
            "base_url": {"type": ["string", "null"]},
            "api_version": {"type": ["string", "null"]},
            "created_at": TIMESTAMP,
            "cooldown": {
                "type": ["object", "null"],
                "description": "set aside by the process that answered (each process keeps its own) "
                "after a refusal or a rate limit",
                "properties": {
                    "reason": {"type": "string"},
                    "since": TIMESTAMP,
                    "until": TIMESTAMP,
                },
            },
        },
        (
            "id",
            "org_id",
            "provider",
            "name",
            "last4",
            "enabled",
            "weight",
            "base_url",
            "api_version",
            "created_at",
            "cooldown",
        ),
    ),
    "Provider": obj(
        {
            "name": PROVIDER_NAME,
            "display_name": {"type": "string"},
            "dialect": {"type": "string", "enum": ["openai", "anthropic"]},
            "base_url": {"type": ["string", "null"], "description": "null: each key names one"},
            "custom": {"type": "boolean"},
            "auth": {"type": ["string", "null"]},
            "models_path": {"type": "string"},
            "key_base_url": {"type": "boolean", "description": "keys carry their own base_url"},
            "key_api_version": {"type": "boolean"},
            "created_at": {"type": ["string", "null"], "format": "date-time"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
        },
        (
            "name",
            "display_name",
            "dialect",
            "base_url",
            "custom",
            "auth",
            "models_path",
            "key_base_url",
            "key_api_version",
            "created_at",
            "updated_at",
        ),
    ),
    "Route": obj(
        {
            "name": {"type": "string"},
            "targets": {"type": "array", "items": ROUTE_TARGET},
            "strategy": {"type": "string", "enum": ["fallback", "weighted"]},
            "retry_on": RETRY_ON,
            "max_attempts": {"type": "integer"},
            "attempt_timeout": {"type": ["number", "null"]},
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
        },
        (
            "name",
            "targets",
            "strategy",
            "retry_on",
            "max_attempts",
            "attempt_timeout",
            "created_at",
            "updated_at",
        ),
    ),
    "Explanation": obj(
        {
            "entry": {"type": "object", "description": "the provider and API path of the route"},
            "model": {"type": ["string", "null"]},
            "route": {"type": ["object", "null"]},
            "refusal": {
                "type": ["object", "null"],
                "description": "the answer the request would get instead of an upstream call",
            },
            "attempts": {
                "type": "array",
                "description": "the attempts in order, if each one failed",
                "items": {"type": "object"},
            },
            "keys": {"type": "array", "items": {"type": "object"}},
        },
        ("entry", "model", "route", "refusal", "attempts", "keys"),
    ),
    "ProviderSettings": obj(
        {
            "org_id": UUID,
            "provider": PROVIDER,
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
        "route": {"type": ["string", "null"], "description": "the route the model named"},
        "provider_key_id": {"type": ["string", "null"], "format": "uuid"},
        "attempts": {"type": "integer", "description": "upstream calls made (0: refused)"},
        "fallbacks": {
            "type": ["array", "null"],
            "description": "why each earlier attempt was abandoned",
            "items": {"type": "object"},
        },
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
        "service_tier": {
            "type": ["string", "null"],
            "description": "the service tier the provider says served it (flex, priority...)",
        },
        "web_search_requests": {
            **_TOKENS,
            "description": "server-side web searches the provider ran and bills",
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
        "route",
        "provider_key_id",
        "attempts",
        "fallbacks",
        "reasoning_tokens",
        "cache_creation_1h_tokens",
        "response_model",
        "cost_usd",
        "service_tier",
        "web_search_requests",
    ),
)
COMPONENTS["RequestPage"] = obj(
    {
        "items": {"type": "array", "items": ref("RequestLog")},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "pass as cursor for the next (older) page; null: no more",
        },
        "live_cursor": {
            "type": "string",
            "description": "pass as after to get the requests stored since this answer",
        },
    },
    ("items", "next_cursor", "live_cursor"),
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
COMPONENTS["OrgUsageReport"] = obj(
    {
        "since": {**TIMESTAMP, "description": "the start of the first hour covered"},
        "until": {**TIMESTAMP, "description": "the end of the last hour covered"},
        "items": {
            "type": "array",
            "items": ref("UsageTotal"),
            "description": "one total per org (key: the org id); orgs without requests left out",
        },
    },
    ("since", "until", "items"),
)
_URL_OR_NULL = {"type": ["string", "null"], "format": "uri"}
COMPONENTS["UIConfig"] = obj(
    {
        "version": {"type": "string", "description": "Lectr's version"},
        "admin_token": {
            "type": "boolean",
            "description": "whether LECTR_ADMIN_TOKEN is set (the sign-in form may take it)",
        },
        "oidc": {
            "oneOf": [
                {"type": "null"},
                obj(
                    {
                        "issuer": {"type": "string"},
                        "client_id": {"type": "string"},
                        "audience": {"type": "string"},
                        "scope": {"type": "string"},
                        "authorization_endpoint": _URL_OR_NULL,
                        "token_endpoint": _URL_OR_NULL,
                        "problem": {
                            "type": ["string", "null"],
                            "description": "why sign-in with the issuer is unavailable now",
                        },
                    },
                    (
                        "issuer",
                        "client_id",
                        "audience",
                        "scope",
                        "authorization_endpoint",
                        "token_endpoint",
                        "problem",
                    ),
                ),
            ],
            "description": "null unless OIDC and LECTR_OIDC_CLIENT_ID are configured",
        },
    },
    ("version", "admin_token", "oidc"),
)

_USD_OUT = {"type": ["string", "null"], "description": "USD, a decimal string; null: no budget"}
COMPONENTS["LimitsUsage"] = obj(
    {
        "requests_this_minute": _COUNT,
        "tokens_this_minute": _COUNT,
        "usd_today": {"type": "string", "description": "USD, settled cost (UTC day)"},
        "usd_this_month": {"type": "string", "description": "USD, settled cost (calendar month)"},
        "concurrent": {
            **_COUNT,
            "description": "requests in flight on every node (at most 5 seconds old)",
        },
    },
    ("requests_this_minute", "tokens_this_minute", "usd_today", "usd_this_month", "concurrent"),
    description="consumption in the current windows as the nodes last reported it",
)
COMPONENTS["Limits"] = obj(
    {
        "org_id": UUID,
        "key_id": {"type": ["string", "null"], "format": "uuid", "description": "null: the org's"},
        "rpm": {"type": ["integer", "null"]},
        "tpm": {"type": ["integer", "null"]},
        "max_concurrent": {"type": ["integer", "null"]},
        "usd_per_day": _USD_OUT,
        "usd_per_month": _USD_OUT,
        "updated_at": {**nullable(TIMESTAMP), "description": "null: no limit is set"},
        "usage": ref("LimitsUsage"),
    },
    (
        "org_id",
        "key_id",
        "rpm",
        "tpm",
        "max_concurrent",
        "usd_per_day",
        "usd_per_month",
        "updated_at",
        "usage",
    ),
)

_RATE_OUT = {"type": ["string", "null"], "description": "USD per million tokens"}
_PRICE_RATES = {k: _RATE_OUT for k in _RATES}
_PRICE_FIELDS = (
    "provider",
    "model",
    "source",
    *_RATES,
    "long_context",
    "tiers",
    "web_search",
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
    "tiers": {
        "type": ["object", "null"],
        "description": "service tier name -> its rates and long_context (null: none listed)",
        "additionalProperties": obj(
            {
                **_PRICE_RATES,
                "long_context": {
                    "type": ["object", "null"],
                    "description": "this tier's own threshold and rates past it",
                },
            },
            (*_RATES, "long_context"),
        ),
    },
    "web_search": {
        "type": ["string", "null"],
        "description": "USD per 1,000 web searches (null: web searches are not priced)",
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
COMPONENTS["WebSearchCostLine"] = obj(
    {
        "kind": {"type": "string", "enum": ["web_search"]},
        "searches": _COUNT,
        "usd_per_thousand": {"type": "string"},
        "cost_usd": {"type": "string", "description": "searches x rate / 1,000"},
    },
    ("kind", "searches", "usd_per_thousand", "cost_usd"),
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
            "description": (
                "the prices used: provider, model, source, checked, tier, threshold, rates "
                "(with web_search when searches were priced), service_tier (when not base)"
            ),
        },
        "lines": {
            "type": "array",
            "items": {"oneOf": [ref("CostLine"), ref("WebSearchCostLine")]},
            "description": "one line per kind of token, and one for web searches when priced",
        },
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
USAGE_RANGE = (USAGE_SINCE, USAGE_UNTIL)

for _name in (
    "Org",
    "ApiKey",
    "User",
    "Member",
    "ProviderKey",
    "ProviderSettings",
    "Provider",
    "Route",
    "Price",
):
    COMPONENTS[f"{_name}List"] = items_of(_name)
