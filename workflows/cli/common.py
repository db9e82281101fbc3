"""What the nodepatch commands share: exit codes, options, JSON output, input checks."""

from __future__ import annotations

import json
from typing import Any

import click

from engine import errors
from engine.model import Run
from workflows.app import App
from workflows.backends.base import Inventory
from workflows.cli.exits import (
    EXIT_BUSY,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_STOPPED,
    EXIT_USAGE,
    EXIT_WARNINGS,
)
from workflows.node_patch import STATES

__all__ = [
    "EXIT_BUSY",
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "EXIT_WARNINGS",
    "emit",
    "handed_over",
    "inventory",
    "json_option",
    "pass_app",
    "until_option",
]

pass_app = click.make_pass_decorator(App)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
until_option = click.option(
    "--until", type=click.Choice(STATES), help="Stop on entering this state, before its step runs."
)


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def inventory(app: App, cluster: str) -> Inventory:
    """The cluster's inventory; a cluster that does not exist is the user's input error."""
    try:
        return app.backend.inventory(cluster)
    except errors.NotFound as exc:
        raise errors.UsageError(str(exc)) from exc


def sleeps_until(what: str, run: Run, why: str | None = None) -> str:
    """What a command says when the run it drove sleeps on a timer: who wakes it. A detached run
    is woken by a worker; a run driven from the command line only by `resume` after its time."""
    assert run.wake_at is not None
    who = "a worker wakes it then, or " if run.detached else "continue with "
    return (
        f"{what} {run.id} sleeps until {run.wake_at:%Y-%m-%d %H:%M:%S} UTC"
        + (f" ({why})" if why else "")
        + f": {who}`nodepatch resume {run.id}` after it (`--now` to wake it now)"
    )


def handed_over(run_id: str, holder: str) -> str:
    """What a command says when another process (a worker) claimed the run it was driving while
    it slept between two checks: that process drives it now (exit 3)."""
    return f"run {run_id} is now driven by {holder}; follow it with `nodepatch status {run_id}`"


def finished_by(run: Run, holder: str) -> str:
    """What a command says when another process (a worker) claimed the run it was driving while
    it slept, and has driven it to its end already: the command reports the end as its own."""
    return f"run {run.id} was driven to its end ({run.state}) by {holder} meanwhile"
