"""`nodepatch sim`: create and show the simulated cluster."""

from __future__ import annotations

from typing import Any

import click

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
@click.option("--non-ha", default=0, show_default=True, type=click.IntRange(0))
@click.option("--stopped-ha", default=0, show_default=True, type=click.IntRange(0))
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
def sim_init(
    path: str,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    speed: float,
    scenario: str | None,
) -> None:
    """Create a simulated cluster in FILE."""
    from workflows.backends.simulated import SimulatedCluster

    if scenario:
        SimulatedCluster.create(path, _read_scenario(scenario), speed=speed)
    else:
        if non_ha + stopped_ha > vms:
            raise errors.UsageError("--non-ha plus --stopped-ha cannot exceed --vms")
        SimulatedCluster.generate(
            path, hosts=hosts, vms=vms, non_ha=non_ha, stopped_ha=stopped_ha, seed=seed, speed=speed
        )
    click.echo(f"simulated cluster written to {path}")


def _read_scenario(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:  # noqa: PTH123
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise errors.UsageError(f"{path}: malformed YAML or JSON") from exc
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
