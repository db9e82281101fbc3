"""The outbox over the audit trail: a consumer cursor and deliveries (webhooks).

`outbox_cursor` keeps how far each consumer has read `run_event`; `outbox_delivery` keeps one
row per (consumer, target, event) with its attempts, next attempt and outcome. The webhook
consumer's cursor starts at the newest event at upgrade time, so history from before the
upgrade is never sent.

Revision ID: 0005_webhooks
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_webhooks"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox_cursor",
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("consumer", name="pk_outbox_cursor"),
    )
    op.create_table(
        "outbox_delivery",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("event_id", sa.BigInteger, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_delivery"),
        sa.ForeignKeyConstraint(
            ["event_id"], ["run_event.id"], name="fk_outbox_delivery_event_id_run_event"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'parked')", name="ck_outbox_delivery_status"
        ),
    )
    op.create_index(
        "uq_outbox_delivery_target_event",
        "outbox_delivery",
        ["consumer", "target", "event_id"],
        unique=True,
    )
    op.create_index("ix_outbox_delivery_due", "outbox_delivery", ["status", "next_attempt_at"])
    op.execute(
        "INSERT INTO outbox_cursor (consumer, position, updated_at) "
        "SELECT 'webhooks', COALESCE(MAX(id), 0), CURRENT_TIMESTAMP FROM run_event"
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_delivery_due", "outbox_delivery")
    op.drop_index("uq_outbox_delivery_target_event", "outbox_delivery")
    op.drop_table("outbox_delivery")
    op.drop_table("outbox_cursor")
