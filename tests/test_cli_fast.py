"""The CLI imports only what a command uses: the import sets that keep it fast, checked without
timing anything (the timings are `make bench`'s: benchmarks/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from engine import db
from workflows import cli
from workflows.cli import COMMANDS

# Never imported by `nodepatch --help`: each is a start-up cost some command does not need.
HEAVY = ("alembic", "pypsrp", "pydantic", "rich", "sqlalchemy", "yaml", "transitions", "psycopg")
# Never imported by `status --json` on an up-to-date SQLite database without a config file.
NOT_FOR_STATUS = (
    "alembic",
    "pypsrp",
    "pydantic",
    "rich",
    "yaml",
    "psycopg",
    "transitions",
    "sqlalchemy.dialects.postgresql",
    "dateutil",
    "workflows.cycle",
    "workflows.report",
)


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """The modules `nodepatch ARGS` imports (from -X importtime), and its stdout."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "workflows", *args],
        env=environ | (env or {}),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return modules, proc.stdout


def loaded(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(f"{r}.") for r in roots))


def test_help_imports_no_command_and_no_heavy_library() -> None:
    """`nodepatch --help` lists every command without importing any of them, nor any database,
    configuration, remoting or terminal library."""
    modules, out = imported("--help")
    assert "workflows.cli" in modules  # the measurement does see our own modules
    for name in COMMANDS:
        assert f"\n  {name} " in out
    assert loaded(modules, HEAVY) == []
    commands = {target.partition(":")[0] for target, _help in COMMANDS.values()}
    assert loaded(modules, tuple(commands)) == []


def test_status_on_an_up_to_date_database_does_not_import_alembic(tmp_path: Path) -> None:
    """`status RUN --json` on a database at this build's revision reads the revision with one
    SELECT: neither alembic nor any other library the command does not use is imported (and the
    output is still the full status)."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    sim = tmp_path / "cluster.json"
    env = {"NODEPATCH_DATABASE_URL": url, "NODEPATCH_SIM": str(sim)}
    imported("db", "upgrade", env=env)
    imported("sim", "init", "--file", str(sim), "--hosts", "2", "--vms", "2", env=env)
    start = subprocess.run(
        [sys.executable, "-m", "workflows", "start", "--cluster", "cluster1", "--node", "hv01"],
        env={k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")} | env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert start.returncode == 0, start.stderr
    run_id = start.stdout.split()[1]
    modules, out = imported("status", run_id, "--json", env={"NODEPATCH_DATABASE_URL": url})
    assert f'"run_id": "{run_id}"' in out
    assert '"state": "Done"' in out
    assert "engine.store" in modules
    assert loaded(modules, NOT_FOR_STATUS) == []


def test_the_head_read_from_the_migration_files_is_alembics() -> None:
    """The head revision the quick schema check compares with is the one alembic computes."""
    assert db.head_revision() == db._alembic_head()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_table_entry_is_the_command_it_names(name: str) -> None:
    """Each line of the command table loads a click command of that name, and the help that
    `--help` lists for it is how the command's own docstring begins."""
    command = cli.main.get_command(click.Context(cli.main), name)
    assert isinstance(command, click.Command)
    assert command.name == name
    listed = COMMANDS[name][1].removesuffix("...")
    assert " ".join((command.help or "").split()).startswith(listed)


def completion(env: dict[str, str]) -> str:
    """What the installed `nodepatch` script answers the shell (the completion variable is
    named after the program)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("nodepatch"))],
        env=environ | env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish", "powershell"])
def test_completion_scripts_for_every_documented_shell(shell: str) -> None:
    """README's completion lines work: click writes the script for each shell."""
    script = completion({"_NODEPATCH_COMPLETE": f"{shell}_source"})
    assert "_NODEPATCH_COMPLETE" in script


def test_completion_sees_the_lazily_loaded_commands_and_their_choices() -> None:
    """Completing through the lazy group finds commands, their options and their choices."""
    words = completion(
        {"_NODEPATCH_COMPLETE": "bash_complete", "COMP_WORDS": "nodepatch st", "COMP_CWORD": "1"}
    )
    assert words.split() == ["plain,start", "plain,status"]
    states = completion(
        {
            "_NODEPATCH_COMPLETE": "bash_complete",
            "COMP_WORDS": "nodepatch runs --state ",
            "COMP_CWORD": "3",
        }
    )
    assert "plain,Draining" in states.split()


def test_the_app_names_the_cycle_workflow_as_the_cycle_does() -> None:
    """The composition root's copy of the cycle's workflow name is the cycle's own."""
    from workflows import app
    from workflows.cycle import params

    assert app.CLUSTER_CYCLE == params.CLUSTER_CYCLE
