"""limits and budgets: per-org and per-key caps, cluster-wide counters

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10

- ``limits``: the caps an admin sets, one row per org (``key_id`` NULL) or
  per Lectr key (``scope_id`` is the org's or the key's id). Writes send
  ``limits:<org id>``.
- ``limit_counters``: one row per (scope, metric, window); nodes draw
  allowance from ``used`` in leases with one atomic ``UPDATE … RETURNING``
  and report what they actually consumed into ``spent``
  (docs/limits.md). ``last_grant`` is the scratch column through which that
  statement returns what it granted.
- ``limit_slots``: concurrency slots each node holds for a scope, with an
  expiry renewed while the node lives (a crashed node's slots come back).
- ``limit_nodes``: node heartbeats (how many nodes share the caps when
  PostgreSQL becomes unreachable and each node enforces its share alone).
- ``limit_alerts``: one row per budget threshold crossed per window, so
  that one node in the cluster sends each alert.

The last four are written by every node in the background and carry no
foreign keys (a deleted org's rows expire with their windows).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    uuid = pg.UUID(as_uuid=False)
    ts = pg.TIMESTAMP(timezone=True)
    now = sa.text("now()")
    op.create_table(
        "limits",
        sa.Column("scope_id", uuid, primary_key=True),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("key_id", uuid, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.BigInteger, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("usd_per_day", sa.Numeric(20, 6), nullable=True),
        sa.Column("usd_per_month", sa.Numeric(20, 6), nullable=True),
        sa.Column("created_at", ts, nullable=False, server_default=now),
        sa.Column("updated_at", ts, nullable=False, server_default=now),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], ondelete="CASCADE", name="limits_org_id_fkey"
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], ondelete="CASCADE", name="limits_key_id_fkey"
        ),
        sa.CheckConstraint(
            "(key_id IS NULL AND scope_id = org_id) OR scope_id = key_id", name="limits_scope"
        ),
        sa.CheckConstraint(
            "rpm > 0 AND tpm > 0 AND max_concurrent > 0 AND usd_per_day > 0 AND usd_per_month > 0",
            name="limits_positive",
        ),
    )
    op.create_index("limits_org_id_idx", "limits", ["org_id"])
    op.execute(
        "CREATE TRIGGER limits_set_updated_at BEFORE UPDATE ON limits "
        "FOR EACH ROW EXECUTE FUNCTION lectr_set_updated_at()"
    )

    op.create_table(
        "limit_counters",
        sa.Column("scope_id", uuid, nullable=False),
        sa.Column("metric", sa.Text, nullable=False),
        sa.Column("window_start", ts, nullable=False),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("used", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("spent", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_grant", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", ts, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("scope_id", "metric", "window_start", name="limit_counters_pkey"),
        sa.CheckConstraint(
            "metric IN ('requests', 'tokens', 'usd_day', 'usd_month')",
            name="limit_counters_metric",
        ),
    )
    op.create_index("limit_counters_window_idx", "limit_counters", ["window_start"])

    op.create_table(
        "limit_slots",
        sa.Column("scope_id", uuid, nullable=False),
        sa.Column("node_id", uuid, nullable=False),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("held", sa.Integer, nullable=False),
        sa.Column("in_use", sa.Integer, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("scope_id", "node_id", name="limit_slots_pkey"),
    )

    op.create_table(
        "limit_nodes",
        sa.Column("node_id", uuid, primary_key=True),
        sa.Column("seen_at", ts, nullable=False, server_default=now),
    )

    op.create_table(
        "limit_alerts",
        sa.Column("scope_id", uuid, nullable=False),
        sa.Column("budget", sa.Text, nullable=False),
        sa.Column("window_start", ts, nullable=False),
        sa.Column("threshold", sa.SmallInteger, nullable=False),
        sa.Column("org_id", uuid, nullable=False),
        sa.Column("created_at", ts, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint(
            "scope_id", "budget", "window_start", "threshold", name="limit_alerts_pkey"
        ),
    )


def downgrade() -> None:
    for table in ("limit_alerts", "limit_nodes", "limit_slots", "limit_counters", "limits"):
        op.drop_table(table)
