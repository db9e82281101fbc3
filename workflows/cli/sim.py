"""`nodepatch sim`: create and show the simulated cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import yaml

from engine import errors
from workflows import render
from workflows.app import App
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
@click.option(
    "--clusters",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Clusters cluster1..clusterK; with more than one, hosts are c1-hv01.., VMs c1-vm001..",
)
@click.option(
    "--hosts", default=3, show_default=True, type=click.IntRange(1, 64), help="Per cluster."
)
@click.option(
    "--vms", default=12, show_default=True, type=click.IntRange(0, 10_000), help="Per cluster."
)
@click.option(
    "--non-ha",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Running non-HA VMs per cluster, placed on its first host (hv01) first.",
)
@click.option(
    "--stopped-ha",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="HA VMs that are off, per cluster, placed on its first host (hv01) first.",
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
    "--patch-seconds",
    "patch_span",
    metavar="LOW[-HIGH]",
    help="Each host's own simulated patch time, drawn from this range by --seed "
    "(default: 60 s, or patcher.simulated.patch_seconds).",
)
@click.option(
    "--reboot-seconds",
    "reboot_span",
    metavar="LOW[-HIGH]",
    help="Each host's own simulated reboot time, drawn from this range by --seed (default 120).",
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
    clusters: int,
    hosts: int,
    vms: int,
    non_ha: int,
    stopped_ha: int,
    seed: int,
    speed: float,
    patch_span: str | None,
    reboot_span: str | None,
    scenario: str | None,
    force: bool,
) -> None:
    """Create simulated clusters in FILE (an SQLite database that processes share)."""
    from workflows.backends.simulated import SimulatedCluster

    patch_seconds = _span(patch_span, "--patch-seconds")
    reboot_seconds = _span(reboot_span, "--reboot-seconds")
    if scenario and (patch_seconds or reboot_seconds):
        raise errors.UsageError(
            "--patch-seconds and --reboot-seconds make hosts; with --from, give each host "
            "its patch_seconds and reboot_seconds in the scenario"
        )
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
                clusters=clusters,
                hosts=hosts,
                vms=vms,
                non_ha=non_ha,
                stopped_ha=stopped_ha,
                seed=seed,
                speed=speed,
                patch_seconds=patch_seconds,
                reboot_seconds=reboot_seconds,
            )
    except OSError as exc:
        raise errors.UsageError(f"cannot write {path}: {exc.strerror}") from exc
    click.echo(f"simulated cluster written to {path}")


def _span(text: str | None, option: str) -> tuple[float, float] | None:
    """`LOW-HIGH` or `N` seconds as a checked (low, high) range; None when not given."""
    if text is None:
        return None
    low, _, high = text.partition("-")
    try:
        span = (float(low), float(high or low))
    except ValueError:
        raise errors.UsageError(
            f"{option}: expected seconds as LOW-HIGH or N (e.g. 1200-2400), got {text!r}"
        ) from None
    from workflows.backends import simfaults

    return simfaults.check_range(span, option)


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
@click.option("--file", "path", type=click.Path(), help="Default: --sim / NODEPATCH_SIM.")
@click.option("--cluster", help="Show this cluster's hosts and VMs only.")
@json_option
@click.pass_obj
def sim_show(app: App, path: str | None, cluster: str | None, as_json: bool) -> None:
    """Show the simulated clusters: hosts and VMs (one cluster), or a line per cluster (several),
    and the operations done so far; --json adds the simulated clock (`clock.sim_time`)."""
    from workflows.backends.simulated import SimulatedCluster

    path = path or app.sim_file
    if not path:
        raise errors.UsageError("sim show: give --file FILE (or --sim FILE / NODEPATCH_SIM)")
    sim = SimulatedCluster(path)
    try:
        if as_json:
            operations = sim.operations(cluster)
            emit({**sim.snapshot(cluster), "operations": operations, "clock": sim.clock()})
            return
        overview = sim.overview() if cluster is None else []
        if len(overview) > 1:
            _show_fleet(path, overview, sim.operations())
        else:
            _show_cluster(sim.snapshot(cluster))
    except errors.NotFound as exc:
        raise errors.UsageError(str(exc)) from exc


def _show_cluster(snap: dict[str, Any]) -> None:
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


_FLEET_COLUMNS = (
    ("CLUSTER", "name"),
    ("HOSTS", "hosts"),
    ("MAINTENANCE", "maintenance"),
    ("NOT_UP", "not_up"),
    ("VMS", "vms"),
    ("RUNNING", "running"),
    ("REQUESTS", "requests"),
    ("OPEN_JOBS", "open_jobs"),
)


def _show_fleet(path: str, overview: list[dict[str, Any]], operations: dict[str, int]) -> None:
    """A line per cluster, the totals, and the operations done (the non-zero ones)."""
    rows = [tuple(c[key] for _, key in _FLEET_COLUMNS) for c in overview]
    totals = [sum(c[key] for c in overview) for _, key in _FLEET_COLUMNS[1:]]
    rows.append(("(all)", *totals))
    click.echo(render.table([title for title, _ in _FLEET_COLUMNS], rows))
    done = ", ".join(f"{op} {n}" for op, n in operations.items() if n)
    click.echo(f"operations: {done or 'none'}")
    show = shlex.join(["nodepatch", "sim", "show", "--file", path, "--cluster", "C"])
    click.echo(f"one cluster's hosts and VMs: `{show}`")
