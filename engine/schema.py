"""The engine's tables. The schema is created only by the alembic migrations (migrations/).

The partial unique indexes name their WHERE clause in `info` rather than as `sqlite_where` /
`postgresql_where`: those keywords make SQLAlchemy import both dialects when this module loads
(a CLI start-up cost), and the migrations, which create the indexes, state the clause for each
database (tests/test_migrations.py checks that the migrated indexes carry it).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = sa.DateTime(timezone=True)

run = sa.Table(
    "run",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(64), nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("state", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("lease_owner", sa.String(256)),
    sa.Column("lease_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", TS),
    sa.Column("heartbeat_at", TS),
    sa.Column("wake_at", TS),
    sa.Column("waiting_for", sa.String(64)),
    sa.Column("failed_from", sa.String(64)),
    sa.Column("error", sa.JSON),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("finished_at", TS),
    sa.Column("audit_head", sa.String(64)),
    sa.Column("parent_run_id", sa.String(64)),
    sa.Column("root_run_id", sa.String(64)),
    sa.Column("child_key", sa.String(256)),
    sa.Column("detached", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_run_subject_finished", "subject", "finished_at"),
    sa.Index("ix_run_state", "state"),
    sa.Index("ix_run_created_at", "created_at"),
    sa.Index("ix_run_parent", "parent_run_id", "child_key", unique=True),
    sa.Index(
        "ux_run_active_subject",
        "subject",
        unique=True,
        info={"where": "finished_at IS NULL"},
    ),
    sa.Index("ix_run_due", "detached", "finished_at", "wake_at"),
)

run_event = sa.Table(
    "run_event",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("run.id"), nullable=False),
    sa.Column("run_version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("trigger", sa.String(64)),
    sa.Column("from_state", sa.String(64)),
    sa.Column("to_state", sa.String(64)),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("lease_token", sa.BigInteger, nullable=False),
    sa.Column("occurred_at", TS, nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_run_event_run_id_id", "run_id", "id"),
    sa.Index(
        "uq_run_event_transition",
        "run_id",
        "run_version",
        unique=True,
        info={"where": "kind = 'transition'"},
    ),
)

published_data = sa.Table(
    "published_data",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("run.id"), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("run_version", sa.Integer, nullable=False),
    sa.Column("published_at", TS, nullable=False),
)

step_journal = sa.Table(
    "step_journal",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("run.id"), primary_key=True),
    sa.Column("step_key", sa.String(256), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("external_ref", sa.Text),
    sa.Column("result", sa.JSON),
    sa.Column("lease_token", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.CheckConstraint("status IN ('intent', 'submitted', 'succeeded', 'failed')", name="status"),
)

resource_lock = sa.Table(
    "resource_lock",
    metadata,
    sa.Column("resource", sa.String(512), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("run.id"), nullable=False),
    sa.Column("acquired_at", TS, nullable=False),
    sa.Index("ix_resource_lock_run_id", "run_id"),
)

run_signal = sa.Table(
    "run_signal",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("run.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("sent_by", sa.String(256), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("consumed_at", TS),
    sa.Column("consumed_run_version", sa.Integer),
    sa.Index("ix_run_signal_run_id_name", "run_id", "name"),
)

# ---- the outbox (migration 0005_webhooks) ---------------------------------------------------
# A consumer reads the append-only run_event log after its cursor and records one delivery per
# (target, event) it routes there; deliveries are retried with backoff and parked after too
# many failures. Generic: the engine knows nothing of HTTP (workflows/webhooks.py sends).

outbox_cursor = sa.Table(
    "outbox_cursor",
    metadata,
    sa.Column("consumer", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

outbox_delivery = sa.Table(
    "outbox_delivery",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("consumer", sa.String(64), nullable=False),
    sa.Column("target", sa.String(128), nullable=False),
    sa.Column("event_id", sa.BigInteger, sa.ForeignKey("run_event.id"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("delivered_at", TS),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'parked')", name="status"),
    sa.Index("uq_outbox_delivery_target_event", "consumer", "target", "event_id", unique=True),
    sa.Index("ix_outbox_delivery_due", "status", "next_attempt_at"),
)
