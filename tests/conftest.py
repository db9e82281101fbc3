"""Shared fixtures: a real database per test (a SQLite file, and PostgreSQL), a clean environment.

PostgreSQL comes from NODEPATCH_TEST_POSTGRES_URL (default: postgres on 127.0.0.1:5432). When it
is unreachable the PostgreSQL tests skip with the reason, unless NODEPATCH_REQUIRE_POSTGRES=1
(set by CI), where they fail instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import db

PG_URL = os.environ.get(
    "NODEPATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = os.environ.get("NODEPATCH_REQUIRE_POSTGRES") == "1"
_template: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NODEPATCH_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("NODEPATCH_") and name not in (
            "NODEPATCH_TEST_POSTGRES_URL",
            "NODEPATCH_REQUIRE_POSTGRES",
            "NODEPATCH_REQUIRE_BROWSER",
        ):
            monkeypatch.delenv(name)


def _admin() -> sa.Engine:
    return sa.create_engine(db.normalise_url(PG_URL), isolation_level="AUTOCOMMIT")


def _postgres_template() -> str:
    """A migrated template database, built once per test session."""
    if "name" in _template:
        return _template["name"]
    name = f"nodepatch_tpl_{os.getpid()}"
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        reason = f"PostgreSQL unreachable at {PG_URL}: {str(exc.orig).strip().splitlines()[0]}"
        if REQUIRE_PG:
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        admin.dispose()
    engine = db.connect(_url_for(name))
    db.upgrade(engine)
    engine.dispose()
    _template["name"] = name
    return name


def _url_for(database: str) -> str:
    return str(
        sa.make_url(db.normalise_url(PG_URL))
        .set(database=database)
        .render_as_string(hide_password=False)
    )


def postgres_database() -> Iterator[str]:
    template = _postgres_template()
    name = f"nodepatch_t_{secrets.token_hex(4)}"
    admin = _admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _url_for(name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "name" in _template:
        admin = _admin()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{_template["name"]}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'nodepatch.db'}"
        engine = db.connect(url, create=True)
        db.upgrade(engine)
        engine.dispose()
        yield url
    else:
        yield from postgres_database()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = db.connect(db_url)
    yield eng
    eng.dispose()
