"""A whole-cluster patch cycle, serial (`--max-parallel 1`, as CAU) against `--max-parallel
auto`, on a simulated cluster with realistic timings, measured on the simulator's clock.

The cluster (`nodepatch sim init`, the same seed for both runs): 16 nodes, 160 VMs (8 of them
stopped HA VMs, left where they are); live migration time grows with VM memory (the simulator's
own rule); each node patches for its own 20-40 simulated minutes and reboots for its own 5-10
(drawn per host from the seed). The simulator runs at `--speed` simulated seconds per real
second, and nodepatch polls every `--poll` real seconds (the engine's `poll_interval_s` and the
cycle's `poll_s`), so that a poll costs little simulated time.

Each cycle is one `nodepatch cycle start` process on a fresh simulated cluster and a fresh
SQLite database; the two run at the same time (so both see the same machine), in a folder on
/dev/shm when there is one (so that database commits, real seconds multiplied by the speed,
cost few simulated ones). A cycle's simulated wall time is the simulator's clock from the
moment the cycle run was created to the moment it ended (the clock is linear in real time:
read once, it gives its value at any moment). It still holds the orchestrator's own real time
(polls, commits, gates) times the speed, which a real cluster would not notice; the printed
lines give, for comparison, the patch + reboot time alone (each wave's longest node, summed)
and the clock over the whole process.

Figures (merged into bench.json): `cycle_serial_s`, `cycle_auto_s` (simulated seconds),
`cycle_speedup` (serial / auto; target at least 1.8), `cycle_migrations_per_moved_vm` (the
`live_migrate` + `move_vm` operations of the simulator, as `sim show --json` counts them, over
the VMs that moved, both runs; target exactly 2: off the node and back) and
`cycle_memory_overcommits` (the simulator's `overcommit` operations, both runs: moments a host
held more running-VM memory than it has; target 0). The benchmark fails, naming why, when a
cycle does not end Done or leaves a VM away from home or in another power state.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import results
from workflows.backends.simulated import SimulatedCluster

CLUSTER = "cluster1"
TARGET_SPEEDUP = 1.8
TARGET_MIGRATIONS = 2.0
TARGET_OVERCOMMITS = 0
SHM = "/dev/shm"  # noqa: S108 - memory-backed: a commit's fsync costs no simulated minutes


@dataclass(frozen=True)
class Shape:
    """The simulated cluster and how fast it runs."""

    hosts: int = 16
    vms: int = 160
    stopped_ha: int = 8
    patch_s: tuple[float, float] = (1200.0, 2400.0)
    reboot_s: tuple[float, float] = (300.0, 600.0)
    speed: float = 800.0
    poll_s: float = 0.05
    seed: int = 1


QUICK = Shape(hosts=5, vms=20, stopped_ha=2, patch_s=(60, 120), reboot_s=(30, 60), speed=200)


@dataclass(frozen=True)
class CycleRun:
    """One cycle: what the simulator saw."""

    max_parallel: str
    floor_s: float  # patch + reboot alone: each wave's longest node, summed over the waves
    sim_s: float  # the simulated clock from the cycle run's creation to its end
    process_sim_s: float  # ... from just before the process started to just after it ended
    real_s: float
    waves: list[list[str]]
    migrations: int  # live_migrate + move_vm operations
    moved_vms: int  # VMs with at least one of those
    running_vms: int  # VMs using memory when the cycle started
    overcommits: int


def _env(folder: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "NODEPATCH_CONFIG": str(folder / "config.yaml"),
        "NODEPATCH_SIM": str(folder / "sim.db"),
    }
    env.pop("NODEPATCH_DATABASE_URL", None)
    return env


def nodepatch(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the nodepatch CLI of this checkout in folder, its config file and simulator there."""
    return subprocess.run(
        [sys.executable, "-m", "workflows", *args],
        cwd=folder,
        env=_env(folder),
        capture_output=True,
        text=True,
        check=False,
    )


def _checked(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = nodepatch(folder, *args)
    if done.returncode != 0:
        raise SystemExit(f"`nodepatch {' '.join(args)}` exited {done.returncode}: {done.stderr}")
    return done


def _span(span: tuple[float, float]) -> str:
    return f"{span[0]:g}-{span[1]:g}"


def setup(folder: Path, shape: Shape) -> SimulatedCluster:
    """A fresh simulated cluster and SQLite database in folder."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        "database: sqlite:///nodepatch.db\n"
        "backend: {kind: simulated, simulated: {file: sim.db}}\n"
        f"engine: {{poll_interval_s: {shape.poll_s}}}\n"
        f"cycle: {{poll_s: {shape.poll_s}}}\n",
        encoding="utf-8",
    )
    _checked(
        folder,
        "sim",
        "init",
        "--file",
        "sim.db",
        "--hosts",
        str(shape.hosts),
        "--vms",
        str(shape.vms),
        "--stopped-ha",
        str(shape.stopped_ha),
        "--seed",
        str(shape.seed),
        "--speed",
        f"{shape.speed:g}",
        "--patch-seconds",
        _span(shape.patch_s),
        "--reboot-seconds",
        _span(shape.reboot_s),
    )
    _checked(folder, "db", "upgrade")
    return SimulatedCluster(folder / "sim.db")


@dataclass
class Started:
    """A cycle process under way, on its own cluster."""

    max_parallel: str
    folder: Path
    sim: SimulatedCluster
    home: dict[str, tuple[str, str]]
    host_s: dict[str, float]  # each host's own patch + reboot time
    process: subprocess.Popen[str]
    start_sim: float
    start_real: float


def start_cycle(folder: Path, shape: Shape, max_parallel: str) -> Started:
    """Set up a fresh cluster and start `nodepatch cycle start` on it (not waited for)."""
    sim = setup(folder, shape)
    snapshot = sim.snapshot(CLUSTER)
    home = {vm["id"]: (vm["host"], vm["state"]) for vm in snapshot["vms"]}
    host_s = {
        h["name"]: h["patch_seconds"] + h["reboot_seconds"]
        for h in snapshot["clusters"][0]["hosts"]
    }
    start_sim, start_real = sim.clock()["sim_time"], time.perf_counter()
    args = ("cycle", "start", "--cluster", CLUSTER, "--max-parallel", max_parallel, "--json")
    with (folder / "cycle.json").open("w") as out, (folder / "cycle.log").open("w") as err:
        process = subprocess.Popen(  # our own CLI, fixed arguments
            [sys.executable, "-m", "workflows", *args],
            cwd=folder,
            env=_env(folder),
            stdout=out,
            stderr=err,
        )
    return Started(max_parallel, folder, sim, home, host_s, process, start_sim, start_real)


def wait_all(started: Sequence[Started]) -> list[CycleRun]:
    """Wait for every cycle process, reading the simulator's clock as soon as each ends."""
    ended: dict[int, tuple[dict[str, float], float]] = {}
    while len(ended) < len(started):
        for index, one in enumerate(started):
            if index not in ended and one.process.poll() is not None:
                ended[index] = (one.sim.clock(), time.perf_counter())
        time.sleep(0.02)
    return [finish_cycle(one, *ended[index]) for index, one in enumerate(started)]


def finish_cycle(started: Started, clock: dict[str, float], end_real: float) -> CycleRun:
    """What the simulator saw of an ended cycle process; SystemExit if it went wrong."""
    sim, what = started.sim, f"cycle --max-parallel {started.max_parallel}"
    out = (started.folder / "cycle.json").read_text(encoding="utf-8")
    err = (started.folder / "cycle.log").read_text(encoding="utf-8")
    err = err.strip().splitlines()[-1] if err.strip() else "(no output)"
    try:
        status = dict(json.loads(out))
    except json.JSONDecodeError:
        raise SystemExit(f"{what} exited {started.process.returncode}: {err}") from None
    if started.process.returncode != 0 or status["state"] != "Done":
        raise SystemExit(
            f"{what} ended {status['state']} (exit {started.process.returncode}): "
            f"{status.get('error') or err}"
        )
    vms = sim.snapshot(CLUSTER)["vms"]
    away = [
        f"{vm['name']} on {vm['host']} {vm['state']}, was on {started.home[vm['id']]}"
        for vm in vms
        if (vm["host"], vm["state"]) != started.home[vm["id"]]
    ]
    if away:
        raise SystemExit(f"{what} left VMs changed: {away}")
    operations, counts = sim.operations(CLUSTER), sim.counts()
    moved = {
        key.split(":", 1)[1]
        for key in counts
        if key.startswith(("live_migrate:", "move_vm:")) and counts[key]
    }
    sim.close()

    def sim_at(iso: str) -> float:  # the simulated clock at that moment
        moment = dt.datetime.fromisoformat(iso).timestamp()
        return clock["sim_time"] + (moment - clock["real_time"]) * clock["speed"]

    waves = [list(w["nodes"]) for w in status["waves"]]
    return CycleRun(
        max_parallel=started.max_parallel,
        floor_s=sum(max(started.host_s[node] for node in wave) for wave in waves),
        sim_s=sim_at(status["finished_at"]) - sim_at(status["created_at"]),
        process_sim_s=clock["sim_time"] - started.start_sim,
        real_s=end_real - started.start_real,
        waves=waves,
        migrations=int(operations["live_migrate"] + operations["move_vm"]),
        moved_vms=len(moved),
        running_vms=sum(state == "Running" for _, state in started.home.values()),
        overcommits=int(operations.get("overcommit", 0)),
    )


def measure(workdir: Path, shape: Shape) -> tuple[dict[str, float], list[CycleRun]]:
    """Both cycles, run at the same time (each on its own cluster and database), so that both
    see the same machine."""
    modes = (("serial", "1"), ("auto", "auto"))
    serial, auto = wait_all([start_cycle(workdir / name, shape, p) for name, p in modes])
    moved = serial.moved_vms + auto.moved_vms
    figures = {
        "cycle_serial_s": round(serial.sim_s, 1),
        "cycle_auto_s": round(auto.sim_s, 1),
        "cycle_speedup": round(serial.sim_s / auto.sim_s, 3),
        "cycle_migrations_per_moved_vm": round((serial.migrations + auto.migrations) / moved, 3)
        if moved
        else 0.0,
        "cycle_memory_overcommits": float(serial.overcommits + auto.overcommits),
    }
    return figures, [serial, auto]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def report(shape: Shape, figures: dict[str, float], runs: Sequence[CycleRun]) -> list[str]:
    """One line per figure, with its target."""
    serial, auto = runs
    head = (
        f"cycle of {shape.hosts} nodes, {shape.vms} VMs (patch {_span(shape.patch_s)} s, "
        f"reboot {_span(shape.reboot_s)} s, speed {shape.speed:g}x, poll {shape.poll_s:g} s)"
    )
    sizes = ",".join(str(len(w)) for w in auto.waves)

    def process(run: CycleRun) -> str:
        return (
            f"patch+reboot alone {run.floor_s:.0f} s; process "
            f"{run.process_sim_s:.0f} s simulated, {run.real_s:.1f} s real"
        )

    return [
        head,
        f"cycle serial (--max-parallel 1)    {figures['cycle_serial_s']:7.0f} s simulated "
        f"({_hours(serial.sim_s)}; {len(serial.waves)} waves; {process(serial)}) "
        "| CAU-style baseline",
        f"cycle auto   (--max-parallel auto) {figures['cycle_auto_s']:7.0f} s simulated "
        f"({_hours(auto.sim_s)}; {len(auto.waves)} waves of {sizes}; {process(auto)}) "
        f"| target <= {serial.sim_s / TARGET_SPEEDUP:.0f} s",
        f"cycle speedup {figures['cycle_speedup']:.2f}x | target >= {TARGET_SPEEDUP}x",
        f"cycle migrations per moved VM {figures['cycle_migrations_per_moved_vm']:.2f} "
        f"({serial.migrations}+{auto.migrations} migrations, {serial.moved_vms}+{auto.moved_vms} "
        f"VMs moved of {serial.running_vms}+{auto.running_vms} running) "
        f"| target exactly {TARGET_MIGRATIONS:g}",
        f"cycle memory overcommits {figures['cycle_memory_overcommits']:.0f} "
        f"(serial {serial.overcommits}, auto {auto.overcommits}) | target {TARGET_OVERCOMMITS}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=Shape.speed)
    parser.add_argument("--poll", type=float, default=Shape.poll_s)
    parser.add_argument("--quick", action="store_true", help="a small cluster (for tests)")
    parser.add_argument(
        "--dir", help=f"where the clusters and databases go (default: {SHM} when there is one)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not write bench.json")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Shape()
    shape = Shape(**{**base.__dict__, "speed": args.speed if not args.quick else base.speed})
    shape = Shape(**{**shape.__dict__, "poll_s": args.poll})
    where = args.dir or (SHM if Path(SHM).is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="nodepatch-cycle-bench-", dir=where) as tmp:
        figures, runs = measure(Path(tmp), shape)
    for line in report(shape, figures, runs):
        print(line, flush=True)
    if not args.no_record:
        results.record(figures)


if __name__ == "__main__":
    main()
