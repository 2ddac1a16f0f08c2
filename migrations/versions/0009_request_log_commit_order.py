"""request_logs rows carry the id of the transaction that stored them

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

A live view (``GET /admin/orgs/{id}/requests?after=``) used to follow the
row ids, which are given when a batch is inserted, not when it commits: a
batch that committed after a newer one (waiting on a rollup row another
node's batch held) could be skipped by every later poll. Each row now
records its transaction id (``pg_current_xact_id()``, as a bigint) and a
live cursor is a PostgreSQL snapshot: the rows new to a poll are exactly the
ones that snapshot could not see, whenever they commit
(``lectr.storage.request_logs.RequestLogStore.newer``).

- ``txid``: nullable, no rewrite (the column is added without a default, the
  default set afterwards, so rows stored before keep NULL: no live view
  needs them);
- ``request_logs_live_idx (org_id, txid, id) WHERE txid IS NOT NULL``: an
  org's rows in commit order. Building it reads every partition while the
  ``ALTER TABLE``'s ACCESS EXCLUSIVE lock is held (until the migration
  commits): inserts and reads of the request log wait meanwhile (the usage
  recorder spills and replays; the proxy is not affected). It is empty for
  the rows stored before.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE request_logs ADD COLUMN txid bigint")
    op.execute(
        "ALTER TABLE request_logs ALTER COLUMN txid "
        "SET DEFAULT (pg_current_xact_id())::text::bigint"
    )
    op.execute(
        "CREATE INDEX request_logs_live_idx ON request_logs (org_id, txid, id) "
        "WHERE txid IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX request_logs_live_idx")
    op.execute("ALTER TABLE request_logs DROP COLUMN txid")
