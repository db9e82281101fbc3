"""Child runs, durable timers and workers.

- `parent_run_id` / `root_run_id`: a run started by another run's step (a cycle's node patches);
  locks are owned by the root. `child_key` names the parent's step that started it, unique per
  parent, so a crash between journaling a child and creating it never leaves two children.
- `detached`: the run is driven by `nodepatch worker`, not by the command that created it.
- One unfinished run per subject, enforced by the database itself.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ACTIVE = sa.text("finished_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("parent_run_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("root_run_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("child_key", sa.String(256), nullable=True))
        batch.add_column(
            sa.Column("detached", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.create_index("ix_run_parent", "run", ["parent_run_id", "child_key"], unique=True)
    op.create_index(
        "ux_run_active_subject",
        "run",
        ["subject"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.create_index("ix_run_due", "run", ["detached", "finished_at", "wake_at"])


def downgrade() -> None:
    op.drop_index("ix_run_due", "run")
    op.drop_index("ux_run_active_subject", "run")
    op.drop_index("ix_run_parent", "run")
    with op.batch_alter_table("run") as batch:
        for column in ("detached", "child_key", "root_run_id", "parent_run_id"):
            batch.drop_column(column)
