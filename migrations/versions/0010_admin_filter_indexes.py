"""Indexes for the admin API's filtered request listings and per-org usage

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

Measured on 5 million rows over 90 days, 200 orgs, one with 40 % of the rows
(``bench/admin_queries.py``; docs/performance.md, "Admin queries at scale"):

- ``GET /admin/orgs/{id}/requests?key_id=`` walked the org's rows newest
  first along ``request_logs_org_created_idx`` and dropped every row of
  another key: a key with few requests read hundreds of thousands of rows
  for one page (150 ms), a key without requests read every row of the org
  (2 million: 1.1 s). ``request_logs_org_key_idx (org_id, key_id,
  created_at DESC, id DESC)`` gives the key's rows in page order.
- ``?provider=`` the same, for a provider that serves few of the org's
  requests (a fallback) or none (configured, unused: the planner then chose
  a parallel scan of every partition with JIT, 0.7 s).
  ``request_logs_org_provider_idx (org_id, provider, created_at DESC, id
  DESC)``.
- ``GET /admin/usage`` (per-org totals; the dashboard's org list asks for
  this month) filters ``usage_hourly`` by hour only, and its primary key
  leads with the org: it read the whole table, however short the range.
  ``usage_hourly_hour_idx (hour)`` reads the range's rows only. Updates of a
  rollup row never change its hour, so they stay HOT (migration 0006): the
  index costs one entry per new rollup row.

The two request_logs indexes cost every insert two more index entries:
measured with 5 million rows stored, a bulk insert of 100,000 rows took
2.2-2.9 s without them and 2.9-3.4 s with them (about 7 µs of the server's
time per row; the recorder's statements spend more per row elsewhere, so
their share there is smaller).

Locks: ``CREATE INDEX`` on the partitioned ``request_logs`` builds the index
on every partition in the migration's transaction (PostgreSQL has no
``CONCURRENTLY`` for a partitioned parent), holding a SHARE lock on the
parent and each partition until the migration commits: inserts into
request_logs wait (the usage recorder spills to its journal and replays
afterwards; the proxy is not affected), reads go on. About 20 s per index
for 5 million rows here. For a large request log, build them beforehand
without blocking (docs/operations.md, "Indexes of migration 0010"): the
migration skips an index that exists under its name (``IF NOT EXISTS``).
``usage_hourly_hour_idx`` locks usage_hourly the same way for a few seconds.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = (
    ("request_logs_org_key_idx", "request_logs", "org_id, key_id, created_at DESC, id DESC"),
    (
        "request_logs_org_provider_idx",
        "request_logs",
        "org_id, provider, created_at DESC, id DESC",
    ),
    ("usage_hourly_hour_idx", "usage_hourly", "hour"),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})")


def downgrade() -> None:
    for name, _, _ in reversed(INDEXES):
        op.execute(f"DROP INDEX IF EXISTS {name}")
