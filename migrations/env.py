"""Alembic environment: runs the migrations on the engine nodepatch hands over, or on
NODEPATCH_DATABASE_URL when alembic is invoked by hand."""

from __future__ import annotations

import os

from alembic import context

from engine import db, schema

config = context.config
target_metadata = schema.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        url = os.environ.get("NODEPATCH_DATABASE_URL")
        if not url:
            raise SystemExit("set NODEPATCH_DATABASE_URL or use `nodepatch db upgrade`")
        engine = db.connect(url, create=True)  # alembic by hand: like `nodepatch db upgrade`
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
