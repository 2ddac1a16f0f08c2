"""initial schema: organizations, keys, provider keys, settings, users, members, request logs

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_UPDATED_AT_TABLES = (
    "organizations",
    "api_keys",
    "provider_keys",
    "org_provider_settings",
    "user_identities",
    "org_members",
)


def _timestamps():
    return [
        sa.Column(
            "created_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column(
            "updated_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    ]


def _org_fk(table):
    return sa.ForeignKeyConstraint(
        ["org_id"], ["organizations.id"], ondelete="CASCADE", name=f"{table}_org_id_fkey"
    )


def upgrade() -> None:
    uuid = pg.UUID(as_uuid=False)
    op.create_table(
        "organizations",
        sa.Column("id", uuid, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        *_timestamps(),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="organizations_name_length"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", uuid, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("key_hash", sa.Text, nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        *_timestamps(),
        sa.Column("revoked_at", pg.TIMESTAMP(timezone=True), nullable=True),
        _org_fk("api_keys"),
        sa.UniqueConstraint("key_hash", name="api_keys_key_hash_key"),
        sa.CheckConstraint("char_length(key_hash) = 64", name="api_keys_key_hash_length"),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="api_keys_name_length"),
    )
    op.create_index("api_keys_org_id_idx", "api_keys", ["org_id", "created_at"])

    op.create_table(
        "provider_keys",
        sa.Column("id", uuid, primary_key=True),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
        sa.Column("dek_nonce", sa.LargeBinary, nullable=False),
        sa.Column("kek_id", sa.Text, nullable=False),
        sa.Column("last4", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        *_timestamps(),
        _org_fk("provider_keys"),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="provider_keys_name_length"),
    )
    op.create_index(
        "provider_keys_org_provider_idx",
        "provider_keys",
        ["org_id", "provider", sa.text("created_at DESC")],
    )
    op.create_index("provider_keys_kek_id_idx", "provider_keys", ["kek_id"])

    op.create_table(
        "org_provider_settings",
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column(
            "allowed_models",
            pg.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{}'::text[]"),
        ),
        sa.Column(
            "blocked_models",
            pg.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{}'::text[]"),
        ),
        *_timestamps(),
        _org_fk("org_provider_settings"),
        sa.PrimaryKeyConstraint("org_id", "provider", name="org_provider_settings_pkey"),
    )

    op.create_table(
        "user_identities",
        sa.Column("id", uuid, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("auth0_user_id", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.text("false")),
        *_timestamps(),
        sa.Column("last_seen_at", pg.TIMESTAMP(timezone=True), nullable=True),
        sa.UniqueConstraint("auth0_user_id", name="user_identities_auth0_user_id_key"),
    )

    op.create_table(
        "org_members",
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        *_timestamps(),
        _org_fk("org_members"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user_identities.id"], ondelete="CASCADE", name="org_members_user_id_fkey"
        ),
        sa.PrimaryKeyConstraint("org_id", "user_id", name="org_members_pkey"),
        sa.CheckConstraint("role IN ('owner', 'admin', 'member')", name="org_members_role"),
    )
    op.create_index("org_members_user_id_idx", "org_members", ["user_id"])

    op.create_table(
        "request_logs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("request_id", uuid, nullable=False),
        sa.Column("created_at", pg.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("key_id", uuid, nullable=True),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("latency_ms", sa.Double, nullable=False),
        sa.Column("ttfb_ms", sa.Double, nullable=True),
        sa.Column("streamed", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("total_tokens", sa.Integer, nullable=True),
        sa.Column("cached_tokens", sa.Integer, nullable=True),
        sa.Column("cache_creation_tokens", sa.Integer, nullable=True),
        sa.Column("usage_source", sa.Text, nullable=False, server_default=sa.text("'none'")),
        sa.Column("error_type", sa.Text, nullable=True),
        sa.UniqueConstraint("request_id", name="request_logs_request_id_key"),
        sa.CheckConstraint(
            "usage_source IN ('provider', 'estimated', 'none')", name="request_logs_usage_source"
        ),
    )
    op.create_index(
        "request_logs_org_created_idx",
        "request_logs",
        ["org_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )

    op.execute(
        """
        CREATE FUNCTION lectr_set_updated_at() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at := now();
            RETURN NEW;
        END
        $$
        """
    )
    for table in _UPDATED_AT_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_set_updated_at BEFORE UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION lectr_set_updated_at()"
        )


def downgrade() -> None:
    for table in (
        "request_logs",
        "org_members",
        "user_identities",
        "org_provider_settings",
        "provider_keys",
        "api_keys",
        "organizations",
    ):
        op.drop_table(table)
    op.execute("DROP FUNCTION lectr_set_updated_at()")
