"""organizations: names unique (case-insensitively); user_identities: email_verified

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-10

Organization names become unique per deployment, compared case-insensitively
(``lower(name)``), so that ``lectr orgs disable NAME`` always means one org.
Names that already collide are renamed first, deterministically, so the
upgrade never fails: in each group of equal names the oldest org (by
``created_at``, then ``id``) keeps its name and the others get the first free
suffix `` (2)``, `` (3)``… Every rename is logged. The downgrade drops the
constraint and does not undo the renames.

``user_identities.email_verified`` records whether the token that last
supplied the email said ``email_verified: true``; only such identities can be
found by email (adding a member by email). Existing identities start
unverified until their next sign-in.
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MAX_NAME = 200
_log = logging.getLogger("lectr.migrations")


def _rename_duplicate_org_names(conn) -> None:
    rows = conn.execute(
        sa.text("SELECT id, name, lower(name) FROM organizations ORDER BY created_at, id")
    ).fetchall()
    taken = {key for _, _, key in rows}
    kept: set[str] = set()
    for org_id, name, key in rows:
        if key not in kept:
            kept.add(key)
            continue
        n = 2
        while True:
            suffix = f" ({n})"
            candidate = name[: MAX_NAME - len(suffix)] + suffix
            candidate_key = conn.execute(sa.text("SELECT lower(:c)"), {"c": candidate}).scalar()
            if candidate_key not in taken:
                break
            n += 1
        conn.execute(
            sa.text("UPDATE organizations SET name = :name WHERE id = :id"),
            {"name": candidate, "id": org_id},
        )
        taken.add(candidate_key)
        _log.warning(
            "migration 0004: organization %s renamed from %r to %r "
            "(organization names are now unique, whatever their case)",
            org_id,
            name,
            candidate,
        )


def upgrade() -> None:
    conn = op.get_bind()
    # no concurrent creation can slip a duplicate in between
    conn.execute(sa.text("LOCK TABLE organizations IN SHARE ROW EXCLUSIVE MODE"))
    _rename_duplicate_org_names(conn)
    op.create_index(
        "organizations_name_lower_key",
        "organizations",
        [sa.text("lower(name)")],
        unique=True,
    )
    op.add_column(
        "user_identities",
        sa.Column("email_verified", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )


def downgrade() -> None:
    op.drop_column("user_identities", "email_verified")
    op.drop_index("organizations_name_lower_key", table_name="organizations")
