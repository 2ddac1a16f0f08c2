"""request_logs read-back indexes: covering org/time index, model and error listings

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

The admin API lists an org's requests newest first (keyset pagination, with
optional provider, model, status and time filters) and sums its usage over a
time range by model, provider or day. At millions of rows:

- ``request_logs_org_created_idx`` becomes covering (INCLUDE the columns the
  totals read), so the totals are an index-only scan of the time range;
- ``request_logs_org_model_idx`` serves listings filtered by model without
  walking the org's other rows;
- ``request_logs_org_errors_idx`` (partial, status >= 400) serves listings of
  failed requests, which are rare;
- statistics on the UTC day let the planner hash-aggregate by day;
- autovacuum visits this append-only table more often, which keeps the
  visibility map (and so index-only scans) current for recent rows.

The indexes are built in the migration's transaction (CREATE INDEX, not
CONCURRENTLY): it blocks inserts into request_logs while it runs, which the
usage recorder rides out (it spills to its journal and replays).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

USAGE_COLUMNS = [
    "provider",
    "model",
    "status",
    "usage_source",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_creation_tokens",
]
_ORDER = [sa.text("created_at DESC"), sa.text("id DESC")]


def upgrade() -> None:
    op.drop_index("request_logs_org_created_idx", table_name="request_logs")
    op.create_index(
        "request_logs_org_created_idx",
        "request_logs",
        ["org_id", *_ORDER],
        postgresql_include=USAGE_COLUMNS,
    )
    op.create_index("request_logs_org_model_idx", "request_logs", ["org_id", "model", *_ORDER])
    op.create_index(
        "request_logs_org_errors_idx",
        "request_logs",
        ["org_id", *_ORDER],
        postgresql_where=sa.text("status >= 400"),
    )
    op.execute(
        "CREATE STATISTICS request_logs_day_stats "
        "ON ((created_at AT TIME ZONE 'UTC')::date) FROM request_logs"
    )
    op.execute(
        "ALTER TABLE request_logs SET (autovacuum_vacuum_insert_scale_factor = 0.02, "
        "autovacuum_vacuum_insert_threshold = 10000)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE request_logs RESET (autovacuum_vacuum_insert_scale_factor, "
        "autovacuum_vacuum_insert_threshold)"
    )
    op.execute("DROP STATISTICS IF EXISTS request_logs_day_stats")
    op.drop_index("request_logs_org_errors_idx", table_name="request_logs")
    op.drop_index("request_logs_org_model_idx", table_name="request_logs")
    op.drop_index("request_logs_org_created_idx", table_name="request_logs")
    op.create_index("request_logs_org_created_idx", "request_logs", ["org_id", *_ORDER])
