"""The audit trail is tamper-evident: edits, deletions and swaps made in SQL are detected."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from engine import audit
from engine.store import Store
from tests.clitools import Cli, make_cli
from tests.test_cli_acceptance import MIXED
from workflows.backends.simulated import SimulatedCluster


@pytest.fixture
def finished(tmp_path: Path, db_url: str) -> tuple[Cli, str]:
    cli = make_cli(tmp_path, db_url)
    SimulatedCluster.create(cli.sim, MIXED)
    run_id = cli("start", "--cluster", "c1", "--node", "hv1", "--json").json()["run_id"]
    return cli, run_id


def _unprotect(conn: sa.Connection) -> None:
    """What a privileged attacker does first: switch off the append-only triggers."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE run_event DISABLE TRIGGER run_event_append_only")
    else:
        conn.exec_driver_sql("DROP TRIGGER run_event_no_update")
        conn.exec_driver_sql("DROP TRIGGER run_event_no_delete")


def _ids(conn: sa.Connection, run_id: str) -> list[int]:
    rows = conn.execute(
        sa.text("SELECT id FROM run_event WHERE run_id = :r ORDER BY id"), {"r": run_id}
    )
    return [r[0] for r in rows]


TAMPERING = {
    "update": "UPDATE run_event SET actor = 'someone-else' WHERE id = :a",
    "delete": "DELETE FROM run_event WHERE id = :a",
    "delete_last": "DELETE FROM run_event WHERE id = :z",
    "swap": None,
}


@pytest.mark.parametrize("attack", list(TAMPERING))
def test_verify_detects_tampering_in_sql(finished: tuple[Cli, str], attack: str) -> None:
    """`audit verify` is clean on an untouched trail and names the event after an UPDATE, a
    DELETE (in the middle or at the end) or a swap of two events."""
    cli, run_id = finished
    assert cli("audit", "verify", run_id).code == 0
    engine = sa.create_engine(cli.db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        _unprotect(conn)
        ids = _ids(conn, run_id)
        a, b, z = ids[2], ids[3], ids[-1]
        if attack == "swap":  # whole rows trade places: each keeps its own valid hash
            for old, new in ((a, -1), (b, a), (-1, b)):
                conn.execute(
                    sa.text("UPDATE run_event SET id = :new WHERE id = :old"),
                    {"old": old, "new": new},
                )
        else:
            conn.execute(sa.text(TAMPERING[attack]), {"a": a, "z": z})
    engine.dispose()
    result = cli("audit", "verify", run_id, "--json")
    assert result.code == 1
    found = [(f["event_id"], f["kind"]) for f in result.json()["findings"]]
    assert (
        found
        == {
            "update": [(a, "edited")],
            "delete": [(b, "deleted")],
            "delete_last": [(ids[-2], "deleted")],
            "swap": [(a, "re-ordered"), (b, "re-ordered")],
        }[attack]
    )
    text = cli("audit", "verify", run_id)
    assert text.code == 1
    where = ids[-2] if attack == "delete_last" else (b if attack == "delete" else a)
    assert f"run {run_id}, event {where}: " in text.out, text.out


def test_every_run_is_verified_without_a_run_argument(finished: tuple[Cli, str]) -> None:
    """With no RUN, every run's chain is checked."""
    cli, _ = finished
    doc = cli("audit", "verify", "--json").json()
    assert doc == {"runs_checked": 1, "intact": True, "findings": []}


def test_verify_finds_nothing_on_a_fresh_run(engine: sa.Engine) -> None:
    """The chain of a new run verifies."""
    store = Store(engine)
    run = store.create_run(
        workflow="w",
        workflow_version=1,
        subject="s",
        state="A",
        params={"names": "it's $weird `name"},
        actor="t@h:1",
    )
    assert audit.verify(store, run.id) == []


GARBLE = {
    # SQLite keeps whatever text it is given; PostgreSQL's json type refuses text that does not
    # parse, so there the attacker garbles it into a JSON document of the wrong shape.
    "sqlite": 'UPDATE run_event SET details = \'{"params": {"cluster": \' WHERE id = :a',
    "postgresql": "UPDATE run_event SET details = '\"{garbled\"' WHERE id = :a",
}


def test_verify_reports_an_event_with_garbled_json_and_checks_the_rest(
    finished: tuple[Cli, str],
) -> None:
    """An event row whose JSON was garbled in SQL is reported as tampered (its ID, why), the
    exit code is 1, and the other events and runs are still checked: a second edit after it
    is found too."""
    cli, run_id = finished
    engine = sa.create_engine(cli.db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        _unprotect(conn)
        ids = _ids(conn, run_id)
        conn.execute(sa.text(GARBLE[conn.dialect.name]), {"a": ids[0]})
        conn.execute(
            sa.text("UPDATE run_event SET actor = 'someone-else' WHERE id = :b"), {"b": ids[4]}
        )
    engine.dispose()
    result = cli("audit", "verify", "--json")
    assert result.code == 1, result.err
    found = [(f["event_id"], f["kind"]) for f in result.json()["findings"]]
    assert found == [(ids[0], "edited"), (ids[4], "edited")]
    text = cli("audit", "verify", run_id)
    assert text.code == 1
    assert "internal error" not in text.err
    assert f"run {run_id}, event {ids[0]}: " in text.out
    if cli.db_url.startswith("sqlite"):
        assert f"event {ids[0]}: its details are not valid JSON" in text.out, text.out
    assert f"run {run_id}, event {ids[4]}: its content does not match its hash" in text.out
