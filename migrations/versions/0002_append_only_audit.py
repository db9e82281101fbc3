"""Make the audit trail append-only in the database itself.

Triggers refuse UPDATE and DELETE on run_event, so even a bug or a careless hand-written query
cannot rewrite history. A privileged user can still drop the triggers; `nodepatch audit verify`
(the hash chain, anchored in run.audit_head) detects what such a user changes.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION nodepatch_run_event_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'run_event is append-only (the nodepatch audit trail)';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("audit_head", sa.String(64), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER run_event_append_only BEFORE UPDATE OR DELETE ON run_event "
            "FOR EACH ROW EXECUTE FUNCTION nodepatch_run_event_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER run_event_no_{action.lower()} BEFORE {action} ON run_event "
            "BEGIN SELECT RAISE(ABORT, 'run_event is append-only (the nodepatch audit trail)'); "
            "END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS run_event_append_only ON run_event")
        op.execute("DROP FUNCTION IF EXISTS nodepatch_run_event_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS run_event_no_update")
        op.execute("DROP TRIGGER IF EXISTS run_event_no_delete")
    with op.batch_alter_table("run") as batch:
        batch.drop_column("audit_head")
