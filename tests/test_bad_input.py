"""Bad input: exit 2, one clear line naming the cause, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from engine import db
from tests.clitools import Cli, make_cli
from tests.test_cli_acceptance import MIXED
from workflows.backends.simulated import SimulatedCluster

START = ("start", "--cluster", "c1", "--node", "hv1")


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    cli = make_cli(tmp_path, db_url)
    SimulatedCluster.create(cli.sim, MIXED)
    return cli


def rows(url: str) -> tuple[int, int]:
    engine = sa.create_engine(db.normalise_url(url))
    with engine.connect() as conn:
        counts = (
            conn.exec_driver_sql("SELECT count(*) FROM run").scalar_one(),
            conn.exec_driver_sql("SELECT count(*) FROM run_event").scalar_one(),
        )
    engine.dispose()
    return counts


def assert_refused(
    cli: Cli, *args: str, match: str, config: str | None = None, env: dict[str, str] | None = None
) -> None:
    if config is not None:
        cli.config.write_text(config, encoding="utf-8")
    before = rows(cli.db_url)
    result = cli(*args, env=env)
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert match in lines[0]
    assert "Traceback" not in result.err
    assert rows(cli.db_url) == before


CONFIGS = {
    "malformed YAML": ("policies: [unclosed\n", "malformed YAML at line"),
    "unknown key": ("polices: {non_ha: save}\n", "polices: unknown key"),
    "unknown nested key": ("policies: {nonha: save}\n", "policies.nonha: unknown key"),
    "wrong type": ("engine: {poll_interval_s: soon}\n", "engine.poll_interval_s: must be a number"),
    "bad choice": ("policies: {non_ha: blok}\n", "policies.non_ha: must be one of"),
    "not a mapping": ("- a\n- b\n", "top level must be a mapping"),
    "missing credential variable": (
        "backend:\n  kind: vmm\n  vmm: {server: vmm01.example, username: svc,"
        " password_env: NODEPATCH_TEST_NO_SUCH_VAR}\n",
        "NODEPATCH_TEST_NO_SUCH_VAR",
    ),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_configuration_is_refused(cli: Cli, case: str) -> None:
    """Each configuration error names the key (or line) at fault."""
    config, match = CONFIGS[case]
    env = {"NODEPATCH_SIM": ""} if "credential" in case else None
    assert_refused(cli, *START, match=match, config=config, env=env)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("start", "--cluster", "nope", "--node", "hv1"), "unknown cluster 'nope'"),
        (("start", "--cluster", "c1", "--node", "hv9"), "node 'hv9' is not in cluster"),
        ((*START, "--until", "Sleeping"), "'Sleeping' is not one of"),
        (("status", "no-such-run"), "no run 'no-such-run'"),
        (("history", "no-such-run"), "no run 'no-such-run'"),
        (("resume", "no-such-run"), "no run 'no-such-run'"),
        (("plan", "--cluster", "c1"), "Missing option '--node'"),
        (("start", "--cluster", "c1", "--node", "hv1", "--non-ha", "yolo"), "'yolo' is not one of"),
    ],
)
def test_bad_arguments_are_refused(cli: Cli, args: tuple[str, ...], match: str) -> None:
    """Unknown cluster, node or run, an invalid state or policy: exit 2 naming it."""
    assert_refused(cli, *args, match=match)


def test_unknown_signal_is_refused(cli: Cli) -> None:
    """A misspelt signal is refused with the valid names, and not recorded."""
    run_id = cli(*START, "--until", "Draining", "--json").json()["run_id"]
    assert_refused(cli, "signal", run_id, "patchd", match="unknown signal 'patchd'")


def test_unreachable_database_is_refused(cli: Cli) -> None:
    """An unreachable database URL: one line naming it."""
    result = cli("--database", "postgresql://nobody@127.0.0.1:1/nodb", *START)
    assert result.code == 2
    assert "cannot open database" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_older_schema_asks_for_db_upgrade_and_writes_nothing(cli: Cli) -> None:
    """A schema older than the code: the message says to run `nodepatch db upgrade` (on this
    database, which is not the default one)."""
    engine = db.connect(cli.db_url)
    command.downgrade(db.alembic_config(engine), "0001")
    engine.dispose()
    before = rows(cli.db_url)
    result = cli(*START)
    assert result.code == 2
    assert f"run `nodepatch --database {cli.db_url} db upgrade`" in result.err
    assert rows(cli.db_url) == before
    assert cli("db", "upgrade").code == 0
    assert cli(*START, "--until", "Draining").code == 3


def test_newer_schema_asks_to_upgrade_nodepatch(cli: Cli) -> None:
    """A schema newer than the code is refused, not touched."""
    engine = db.connect(cli.db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffff9999'")
    engine.dispose()
    assert_refused(cli, *START, match="newer than this nodepatch")


def test_debug_shows_the_traceback(cli: Cli) -> None:
    """--debug adds the traceback for the same error."""
    result = cli("--debug", "status", "no-such-run")
    assert result.code == 2
    assert "Traceback" in result.err
