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
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, TIMESTAMP, UUID

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
    CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="provider_keys_name_length"),
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

user_identities = Table(
    "user_identities",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True, server_default=_uuid),
    # The OIDC subject (``sub``); named after Auth0, works for any issuer.
    Column("auth0_user_id", Text, nullable=False, unique=True),
    Column("email", Text, nullable=True),
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
    CheckConstraint(
        "usage_source IN ('provider', 'estimated', 'none')", name="request_logs_usage_source"
    ),
    # Listing newest first, and (covering) the usage totals as an index-only
    # scan; see migrations/versions/0002_request_log_indexes.py.
    Index(
        "request_logs_org_created_idx",
        "org_id",
        text("created_at DESC"),
        text("id DESC"),
        postgresql_include=[
            "provider",
            "model",
            "status",
            "usage_source",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cached_tokens",
            "cache_creation_tokens",
        ],
    ),
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
    # time-range scans across orgs (migration 0003)
    Index("request_logs_created_brin", "created_at", postgresql_using="brin"),
    # replays of the spill journal conflict on this pair (one request, one row)
    UniqueConstraint("request_id", "created_at", name="request_logs_request_id_key"),
    postgresql_partition_by="RANGE (created_at)",
)

TABLES_WITH_UPDATED_AT = (
    "organizations",
    "api_keys",
    "provider_keys",
    "org_provider_settings",
    "user_identities",
    "org_members",
)
