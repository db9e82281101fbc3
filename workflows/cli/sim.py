"""`nodepatch sim`: create and show the simulated cluster."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from engine import errors
from workflows import render
from workflows.cli.common import (
    emit,
    json_option,
)

# ---- simulator ---------------------------------------------------------------------------


@click.group("sim")
def sim_group() -> None:
    """The simulated cluster (demo, dry runs, tests)."""


@sim_group.command("init")
@click.option("--file", "path", required=True, type=click.Path())
@click.option("--hosts", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--vms", default=12, show_default=True, type=click.IntRange(0, 10_000))
@click.option(
    "--non-ha",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Running non-HA VMs, placed on the first host (hv01) first.",
)
@click.option(
    "--stopped-ha",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="HA VMs that are off, placed on the first host (hv01) first.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--speed",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Simulated seconds per real second; 0 = every job completes at once.",
)
@click.option(
    "--from",
    "scenario",
    type=click.Path(exists=True, dir_okay=False),
    help="A SCENARIO file (YAML or JSON) in the shape of `sim show --json`.",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def sim_init(
    path: str,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    speed: float,
    scenario: str | None,
    force: bool,
) -> None:
    """Create a simulated cluster in FILE."""
    from workflows.backends.simulated import SimulatedCluster

    if Path(path).exists() and not force:
        raise errors.UsageError(f"{path} already exists; pass --force to replace it")
    if non_ha + stopped_ha > vms:
        raise errors.UsageError("--non-ha plus --stopped-ha cannot exceed --vms")
    try:
        if scenario:
            _create_from(path, scenario, speed)
        else:
            SimulatedCluster.generate(
                path,
                hosts=hosts,
                vms=vms,
                non_ha=non_ha,
                stopped_ha=stopped_ha,
                seed=seed,
                speed=speed,
            )
    except OSError as exc:
        raise errors.UsageError(f"cannot write {path}: {exc.strerror}") from exc
    click.echo(f"simulated cluster written to {path}")


def _create_from(path: str, scenario: str, speed: float) -> None:
    from workflows.backends.simulated import SimulatedCluster

    data = _read_scenario(scenario)
    try:
        SimulatedCluster.create(path, data, speed=speed)
    except errors.UsageError as exc:
        raise errors.UsageError(f"{scenario}: {exc}") from exc


class _ScenarioLoader(yaml.SafeLoader):
    """Safe YAML whose only booleans are true and false (as in YAML 1.2), so that a fault's
    `on:` key (and `yes`, `no`, `off`) stays a string."""


_BOOL = "tag:yaml.org,2002:bool"
_ScenarioLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ScenarioLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_scenario(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:  # noqa: PTH123
            data = yaml.load(fh, Loader=_ScenarioLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise errors.UsageError(f"{path}: malformed YAML or JSON{where}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise errors.UsageError(f"cannot read {path}: {reason}") from exc
    if not isinstance(data, dict):
        raise errors.UsageError(f"{path}: a scenario must be a mapping")
    return data


@sim_group.command("show")
@click.option("--file", "path", required=True, type=click.Path())
@json_option
def sim_show(path: str, as_json: bool) -> None:
    """Show the simulated cluster's hosts and VMs."""
    from workflows.backends.simulated import SimulatedCluster

    snap = SimulatedCluster(path).snapshot()
    if as_json:
        emit(snap)
        return
    for cluster in snap["clusters"]:
        click.echo(f"cluster {cluster['name']}")
        click.echo(
            render.table(
                ("HOST", "MEMORY_MB", "MAINTENANCE", "STATE"),
                [
                    (
                        h["name"],
                        h["memory_mb"],
                        "yes" if h["maintenance"] else "no",
                        h.get("state", "Up"),
                    )
                    for h in cluster["hosts"]
                ],
            )
        )
    click.echo()
    click.echo(
        render.table(
            ("VM", "ID", "HOST", "HA", "STATE", "MEMORY_MB"),
            [
                (
                    v["name"],
                    v["id"],
                    v["host"],
                    "yes" if v["ha"] else "no",
                    v["state"],
                    v["memory_mb"],
                )
                for v in snap["vms"]
            ],
        )
    )
