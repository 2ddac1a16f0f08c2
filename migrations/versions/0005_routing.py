"""routing: key pools (weight, per-key base URL), custom providers, org routes, attempts in request logs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

- ``provider_keys`` become pools: several enabled keys per (org, provider),
  each with a ``weight``; Azure keys name their resource (``base_url``) and
  API version.
- ``custom_providers``: upstreams a global admin adds (vLLM, Ollama, a
  private endpoint), served on ``/<name>/v1/…`` like the built-ins.
- ``org_routes``: an org's virtual models (targets, strategy, retry policy).
- ``request_logs`` records the route, the provider key used, the number of
  upstream attempts and why each earlier attempt was abandoned. New columns
  are nullable or have defaults: adding them rewrites nothing.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NEW_UPDATED_AT_TABLES = ("custom_providers", "org_routes")


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


def upgrade() -> None:
    uuid = pg.UUID(as_uuid=False)
    op.add_column(
        "provider_keys",
        sa.Column("weight", sa.Integer, nullable=False, server_default=sa.text("1")),
    )
    op.add_column("provider_keys", sa.Column("base_url", sa.Text, nullable=True))
    op.add_column("provider_keys", sa.Column("api_version", sa.Text, nullable=True))
    op.create_check_constraint(
        "provider_keys_weight_range", "provider_keys", "weight BETWEEN 1 AND 1000"
    )

    op.create_table(
        "custom_providers",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("dialect", sa.Text, nullable=False),
        sa.Column("base_url", sa.Text, nullable=False),
        sa.Column("auth", sa.Text, nullable=False),
        sa.Column("models_path", sa.Text, nullable=False, server_default=sa.text("'/v1/models'")),
        *_timestamps(),
        sa.CheckConstraint("dialect IN ('openai', 'anthropic')", name="custom_providers_dialect"),
        sa.CheckConstraint(
            "auth IN ('bearer', 'x-api-key', 'api-key')", name="custom_providers_auth"
        ),
    )

    op.create_table(
        "org_routes",
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("targets", pg.JSONB, nullable=False),
        sa.Column("strategy", sa.Text, nullable=False),
        sa.Column("retry_on", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("max_attempts", sa.SmallInteger, nullable=False),
        sa.Column("attempt_timeout", sa.Double, nullable=True),
        *_timestamps(),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], ondelete="CASCADE", name="org_routes_org_id_fkey"
        ),
        sa.PrimaryKeyConstraint("org_id", "name", name="org_routes_pkey"),
        sa.CheckConstraint("strategy IN ('fallback', 'weighted')", name="org_routes_strategy"),
        sa.CheckConstraint("max_attempts BETWEEN 1 AND 10", name="org_routes_max_attempts"),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 256", name="org_routes_name_length"),
    )
    for table in _NEW_UPDATED_AT_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_set_updated_at BEFORE UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION lectr_set_updated_at()"
        )

    op.add_column("request_logs", sa.Column("route", sa.Text, nullable=True))
    op.add_column("request_logs", sa.Column("provider_key_id", uuid, nullable=True))
    op.add_column(
        "request_logs",
        sa.Column("attempts", sa.SmallInteger, nullable=False, server_default=sa.text("1")),
    )
    op.add_column("request_logs", sa.Column("fallbacks", pg.JSONB, nullable=True))


def downgrade() -> None:
    for column in ("fallbacks", "attempts", "provider_key_id", "route"):
        op.drop_column("request_logs", column)
    op.drop_table("org_routes")
    op.drop_table("custom_providers")
    op.drop_constraint("provider_keys_weight_range", "provider_keys")
    for column in ("api_version", "base_url", "weight"):
        op.drop_column("provider_keys", column)
