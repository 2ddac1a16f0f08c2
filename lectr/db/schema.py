"""The database model, as SQLAlchemy metadata.

Lectr's datastores write their SQL by hand; this module is the reference the
migrations must produce. ``tests/test_migrations.py`` upgrades a real
database and checks with ``alembic.autogenerate.compare_metadata`` that the
result matches this model exactly, so the two cannot drift.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID

metadata = MetaData()

_now = text("now()")
_uuid = text("gen_random_uuid()")


def _timestamps() -> list[Column]:
    return [
        Column("created_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
        Column("updated_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    ]


organizations = Table(
    "organizations",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True, server_default=_uuid),
    Column("name", Text, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    *_timestamps(),
    CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="organizations_name_length"),
    # names are unique per deployment, whatever their case (migration 0004)
    Index("organizations_name_lower_key", text("lower(name)"), unique=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True, server_default=_uuid),
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey("organizations.id", ondelete="CASCADE", name="api_keys_org_id_fkey"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("prefix", Text, nullable=False),
    *_timestamps(),
    Column("revoked_at", TIMESTAMP(timezone=True), nullable=True),
    CheckConstraint("char_length(key_hash) = 64", name="api_keys_key_hash_length"),
    CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="api_keys_name_length"),
    Index("api_keys_org_id_idx", "org_id", "created_at"),
)

provider_keys = Table(
    "provider_keys",
    metadata,
    # No server default: the id is bound into the ciphertext's associated
    # data, so the application picks it before encrypting.
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey("organizations.id", ondelete="CASCADE", name="provider_keys_org_id_fkey"),
        nullable=False,
    ),
    Column("provider", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("wrapped_dek", LargeBinary, nullable=False),
    Column("dek_nonce", LargeBinary, nullable=False),
    Column("kek_id", Text, nullable=False),
    Column("last4", Text, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    *_timestamps(),
    # key pools (migration 0005): spread by weight; Azure keys name their
    # resource and API version
    Column("weight", Integer, nullable=False, server_default=text("1")),
    Column("base_url", Text, nullable=True),
    Column("api_version", Text, nullable=True),
    CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="provider_keys_name_length"),
    CheckConstraint("weight BETWEEN 1 AND 1000", name="provider_keys_weight_range"),
    Index("provider_keys_org_provider_idx", "org_id", "provider", text("created_at DESC")),
    Index("provider_keys_kek_id_idx", "kek_id"),
)

org_provider_settings = Table(
    "org_provider_settings",
    metadata,
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey(
            "organizations.id", ondelete="CASCADE", name="org_provider_settings_org_id_fkey"
        ),
        nullable=False,
    ),
    Column("provider", Text, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("allowed_models", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("blocked_models", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    *_timestamps(),
    PrimaryKeyConstraint("org_id", "provider", name="org_provider_settings_pkey"),
)

custom_providers = Table(
    "custom_providers",
    metadata,
    Column("name", Text, primary_key=True),
    Column("display_name", Text, nullable=False),
    Column("dialect", Text, nullable=False),
    Column("base_url", Text, nullable=False),
    Column("auth", Text, nullable=False),
    Column("models_path", Text, nullable=False, server_default=text("'/v1/models'")),
    *_timestamps(),
    CheckConstraint("dialect IN ('openai', 'anthropic')", name="custom_providers_dialect"),
    CheckConstraint("auth IN ('bearer', 'x-api-key', 'api-key')", name="custom_providers_auth"),
)

org_routes = Table(
    "org_routes",
    metadata,
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey("organizations.id", ondelete="CASCADE", name="org_routes_org_id_fkey"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("targets", JSONB, nullable=False),
    Column("strategy", Text, nullable=False),
    Column("retry_on", ARRAY(Text), nullable=False),
    Column("max_attempts", SmallInteger, nullable=False),
    Column("attempt_timeout", Double, nullable=True),
    *_timestamps(),
    PrimaryKeyConstraint("org_id", "name", name="org_routes_pkey"),
    CheckConstraint("strategy IN ('fallback', 'weighted')", name="org_routes_strategy"),
    CheckConstraint("max_attempts BETWEEN 1 AND 10", name="org_routes_max_attempts"),
    CheckConstraint("char_length(name) BETWEEN 1 AND 256", name="org_routes_name_length"),
)

user_identities = Table(
    "user_identities",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True, server_default=_uuid),
    # The OIDC subject (``sub``); named after Auth0, works for any issuer.
    Column("auth0_user_id", Text, nullable=False, unique=True),
    Column("email", Text, nullable=True),
    # the token that supplied ``email`` said ``email_verified: true`` (migration 0004)
    Column("email_verified", Boolean, nullable=False, server_default=text("false")),
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    *_timestamps(),
    Column("last_seen_at", TIMESTAMP(timezone=True), nullable=True),
)

org_members = Table(
    "org_members",
    metadata,
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey("organizations.id", ondelete="CASCADE", name="org_members_org_id_fkey"),
        nullable=False,
    ),
    Column(
        "user_id",
        UUID(as_uuid=False),
        ForeignKey("user_identities.id", ondelete="CASCADE", name="org_members_user_id_fkey"),
        nullable=False,
    ),
    Column("role", Text, nullable=False),
    *_timestamps(),
    PrimaryKeyConstraint("org_id", "user_id", name="org_members_pkey"),
    CheckConstraint("role IN ('owner', 'admin', 'member')", name="org_members_role"),
    Index("org_members_user_id_idx", "user_id"),
)

# Append-only. No foreign key to organizations: rows are written in batches
# after the fact (and replayed from the spill journal), and deleting an org
# deletes its rows explicitly.
# Partitioned by range of created_at (migration 0008): the partitions
# (request_logs_pYYYYMMDD, request_logs_default) are made by the migration and
# the partition job, not by this model. Unique constraints include created_at.
request_logs = Table(
    "request_logs",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("request_id", UUID(as_uuid=False), nullable=False),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False, primary_key=True),
    Column("org_id", UUID(as_uuid=False), nullable=False),
    Column("key_id", UUID(as_uuid=False), nullable=True),
    Column("provider", Text, nullable=False),
    Column("model", Text, nullable=True),
    Column("method", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("latency_ms", Double, nullable=False),
    Column("ttfb_ms", Double, nullable=True),
    Column("streamed", Boolean, nullable=False, server_default=text("false")),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("total_tokens", Integer, nullable=True),
    Column("cached_tokens", Integer, nullable=True),
    Column("cache_creation_tokens", Integer, nullable=True),
    Column("usage_source", Text, nullable=False, server_default=text("'none'")),
    Column("error_type", Text, nullable=True),
    # routing (migration 0005)
    Column("route", Text, nullable=True),
    Column("provider_key_id", UUID(as_uuid=False), nullable=True),
    Column("attempts", SmallInteger, nullable=False, server_default=text("1")),
    Column("fallbacks", JSONB, nullable=True),
    # migration 0006: pricing
    Column("reasoning_tokens", Integer, nullable=True),
    Column("cache_creation_1h_tokens", Integer, nullable=True),
    Column("response_model", Text, nullable=True),  # the model the provider says it served
    Column("usage_raw", Text, nullable=True),  # the provider's usage object (<= 4 KiB)
    Column("cost_usd", Numeric, nullable=True),  # NULL: unpriced
    Column("price_basis_id", BigInteger, nullable=True),  # price_bases.id (no FK: append-only)
    # migration 0009: the storing transaction's id, for live views in commit order
    Column(
        "txid",
        BigInteger,
        nullable=True,
        server_default=text("((pg_current_xact_id())::text)::bigint"),
    ),
    # migration 0011: what a cost depends on beyond tokens
    Column("service_tier", Text, nullable=True),  # the tier the provider says served it
    Column("web_search_requests", Integer, nullable=True),  # server-side searches billed
    CheckConstraint(
        "usage_source IN ('provider', 'estimated', 'none')", name="request_logs_usage_source"
    ),
    # Listing newest first (usage totals read usage_hourly; migration 0006
    # dropped the columns this index INCLUDEd for them)
    Index("request_logs_org_created_idx", "org_id", text("created_at DESC"), text("id DESC")),
    Index(
        "request_logs_org_model_idx", "org_id", "model", text("created_at DESC"), text("id DESC")
    ),
    Index(
        "request_logs_org_errors_idx",
        "org_id",
        text("created_at DESC"),
        text("id DESC"),
        postgresql_where=text("status >= 400"),
    ),
    # an org's rows of one key, or one provider, in page order: filtered
    # listings read about what they return (migration 0010)
    Index("request_logs_org_key_idx", "org_id", "key_id", text("created_at DESC"), text("id DESC")),
    Index(
        "request_logs_org_provider_idx",
        "org_id",
        "provider",
        text("created_at DESC"),
        text("id DESC"),
    ),
    # an org's rows in commit order: live views (migration 0009)
    Index(
        "request_logs_live_idx",
        "org_id",
        "txid",
        "id",
        postgresql_where=text("txid IS NOT NULL"),
    ),
    # time-range scans across orgs (migration 0003)
    Index("request_logs_created_brin", "created_at", postgresql_using="brin"),
    # replays of the spill journal conflict on this pair (one request, one row)
    UniqueConstraint("request_id", "created_at", name="request_logs_request_id_key"),
    postgresql_partition_by="RANGE (created_at)",
)

# Limits and budgets (migration 0007, docs/limits.md). ``scope_id`` is the
# org's id for an org's limits, the key's id for a key's.
limits = Table(
    "limits",
    metadata,
    Column("scope_id", UUID(as_uuid=False), primary_key=True),
    Column(
        "org_id",
        UUID(as_uuid=False),
        ForeignKey("organizations.id", ondelete="CASCADE", name="limits_org_id_fkey"),
        nullable=False,
    ),
    Column(
        "key_id",
        UUID(as_uuid=False),
        ForeignKey("api_keys.id", ondelete="CASCADE", name="limits_key_id_fkey"),
        nullable=True,
    ),
    Column("rpm", Integer, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("usd_per_day", Numeric(20, 6), nullable=True),
    Column("usd_per_month", Numeric(20, 6), nullable=True),
    *_timestamps(),
    CheckConstraint(
        "(key_id IS NULL AND scope_id = org_id) OR scope_id = key_id", name="limits_scope"
    ),
    CheckConstraint(
        "rpm > 0 AND tpm > 0 AND max_concurrent > 0 AND usd_per_day > 0 AND usd_per_month > 0",
        name="limits_positive",
    ),
    Index("limits_org_id_idx", "org_id"),
)

# The cluster-wide counters, slots, node heartbeats and alert claims are
# written by every node in the background; no foreign keys (a deleted org's
# rows expire with their windows).
limit_counters = Table(
    "limit_counters",
    metadata,
    Column("scope_id", UUID(as_uuid=False), nullable=False),
    Column("metric", Text, nullable=False),
    Column("window_start", TIMESTAMP(timezone=True), nullable=False),
    Column("org_id", UUID(as_uuid=False), nullable=False),
    Column("used", BigInteger, nullable=False, server_default=text("0")),
    Column("spent", BigInteger, nullable=False, server_default=text("0")),
    Column("last_grant", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    PrimaryKeyConstraint("scope_id", "metric", "window_start", name="limit_counters_pkey"),
    CheckConstraint(
        "metric IN ('requests', 'tokens', 'usd_day', 'usd_month')", name="limit_counters_metric"
    ),
    Index("limit_counters_window_idx", "window_start"),
)

limit_slots = Table(
    "limit_slots",
    metadata,
    Column("scope_id", UUID(as_uuid=False), nullable=False),
    Column("node_id", UUID(as_uuid=False), nullable=False),
    Column("org_id", UUID(as_uuid=False), nullable=False),
    Column("held", Integer, nullable=False),
    Column("in_use", Integer, nullable=False),
    Column("expires_at", TIMESTAMP(timezone=True), nullable=False),
    PrimaryKeyConstraint("scope_id", "node_id", name="limit_slots_pkey"),
)

limit_nodes = Table(
    "limit_nodes",
    metadata,
    Column("node_id", UUID(as_uuid=False), primary_key=True),
    Column("seen_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
)

limit_alerts = Table(
    "limit_alerts",
    metadata,
    Column("scope_id", UUID(as_uuid=False), nullable=False),
    Column("budget", Text, nullable=False),
    Column("window_start", TIMESTAMP(timezone=True), nullable=False),
    Column("threshold", SmallInteger, nullable=False),
    Column("org_id", UUID(as_uuid=False), nullable=False),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
    PrimaryKeyConstraint(
        "scope_id", "budget", "window_start", "threshold", name="limit_alerts_pkey"
    ),
)

# The rates each stored cost was computed with, once per distinct set
# (id: the first 8 bytes of the SHA-256 of the document).
price_bases = Table(
    "price_bases",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("basis", JSONB, nullable=False),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False, server_default=_now),
)

# Global admins' prices: overrides of catalogue entries and custom models.
price_overrides = Table(
    "price_overrides",
    metadata,
    Column("provider", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("prices", JSONB, nullable=False),
    *_timestamps(),
    PrimaryKeyConstraint("provider", "model", name="price_overrides_pkey"),
    CheckConstraint(
        "char_length(provider) BETWEEN 1 AND 64 AND char_length(model) BETWEEN 1 AND 256",
        name="price_overrides_name_length",
    ),
)

# Hourly totals of request_logs, kept by the usage flusher in the same
# transaction as the rows. A NULL model is stored as '', a NULL key as the
# nil UUID. No foreign key, as for request_logs: deleting an org deletes its
# rollups explicitly; request-log retention leaves them.
_ROLLUP_COUNTS = (
    "requests",
    "errors",
    "unmetered",
    "estimated",
    "unpriced",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "reasoning_tokens",
)
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("org_id", UUID(as_uuid=False), nullable=False),
    Column("hour", TIMESTAMP(timezone=True), nullable=False),
    Column("provider", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("key_id", UUID(as_uuid=False), nullable=False),
    *[
        Column(name, BigInteger, nullable=False, server_default=text("0"))
        for name in _ROLLUP_COUNTS
    ],
    Column("cost_usd", Numeric, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("org_id", "hour", "provider", "model", "key_id", name="usage_hourly_pkey"),
    # every org's totals over a range (migration 0010)
    Index("usage_hourly_hour_idx", "hour"),
)

TABLES_WITH_UPDATED_AT = (
    "organizations",
    "api_keys",
    "provider_keys",
    "org_provider_settings",
    "user_identities",
    "org_members",
    "custom_providers",
    "org_routes",
    "limits",
    "price_overrides",
)
