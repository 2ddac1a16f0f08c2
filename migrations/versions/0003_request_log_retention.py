"""request_logs: a BRIN index on created_at for the retention job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``LECTR_REQUEST_LOG_RETENTION_DAYS`` deletes rows older than N days, in
batches, oldest first. Rows arrive in time order, so a BRIN index on
``created_at`` finds them for a few pages of index (it costs next to nothing
on insert, unlike a B-tree).
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "request_logs_created_brin", "request_logs", ["created_at"], postgresql_using="brin"
    )


def downgrade() -> None:
    op.drop_index("request_logs_created_brin", table_name="request_logs")
