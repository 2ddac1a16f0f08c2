"""The service tier and the web searches of each request

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

A request's cost depends on more than its tokens: OpenAI bills Flex
processing at half its standard rates and Priority processing at more, and
Anthropic bills each server-side web search (10 USD per 1,000). The answer
says which tier served it and how many searches ran; the row keeps both, so
that the cost stored with it can be explained (``GET /admin/requests/{id}``)
and checked:

- ``service_tier``: the tier the provider reported (``flex``, ``priority``,
  ``default``, ``standard``, ...), NULL when it reported none;
- ``web_search_requests``: the searches it billed, NULL when it reported none.

Both are nullable without a default: adding them to the partitioned table
changes its catalogue only (no row is rewritten; an ACCESS EXCLUSIVE lock on
``request_logs`` and its partitions for the moment of the change). Nodes of
the previous version keep inserting without them (NULL).
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE request_logs"
        " ADD COLUMN IF NOT EXISTS service_tier text,"
        " ADD COLUMN IF NOT EXISTS web_search_requests integer"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE request_logs"
        " DROP COLUMN IF EXISTS web_search_requests,"
        " DROP COLUMN IF EXISTS service_tier"
    )
