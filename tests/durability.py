"""Shared helpers for the durability suites: scenarios, configs, crash traces and cluster checks.

Everything here observes real things: the simulated cluster file (placement, operation counts)
and the real database (runs, audit events, published data). Nothing is mocked.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import db
from engine.model import Event, Run
from engine.store import Store
from tests.clitools import Cli, Result
from workflows.backends import simfaults
from workflows.backends.simulated import SimulatedCluster

H = 8192
LEASE_TTL_S = 1.5
EXIT_DONE, EXIT_FAILED, EXIT_STOPPED, EXIT_BUSY = 0, 1, 3, 4
CRASH_EXIT = 137

# Every call that changes the cluster, as the simulator counts them.
MUTATING_OPS = tuple(sorted(simfaults.JOB_OPS))
# What the cluster itself did as a consequence (drain migrations, someone else's actions).
EFFECT_OPS = ("live_migrate", "admin_move", "admin_delete", "admin_set_state")
# A whole patch of hv1 with two HA VMs h1 and h2: every operation exactly once.
ONCE = {
    "enter_maintenance:hv1": 1,
    "live_migrate:h1": 1,
    "live_migrate:h2": 1,
    "reboot_host:hv1": 1,
    "exit_maintenance:hv1": 1,
    "move_vm:h1": 1,
    "move_vm:h2": 1,
}


def config(
    *,
    lease_ttl_s: float = LEASE_TTL_S,
    patching_timeout_s: float = 20,
    attempts: int = 3,
    patch_seconds: float | None = None,
    extra: str = "",
) -> str:
    """A fast configuration: tiny poll interval and backoff, a short lease."""
    text = (
        f"engine: {{poll_interval_s: 0.005, lease_ttl_s: {lease_ttl_s}}}\n"
        f"retries: {{attempts: {attempts}, backoff_s: 0.01, backoff_max_s: 0.05}}\n"
        f"timeouts_s: {{Patching: {patching_timeout_s}}}\n"
    )
    if patch_seconds is not None:
        text += f"patcher: {{kind: simulated, simulated: {{patch_seconds: {patch_seconds}}}}}\n"
    return text + extra


def make_cli(directory: Path, db_url: str, cfg: str | None = None, sim: str = "cluster") -> Cli:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(cfg if cfg is not None else config(), encoding="utf-8")
    return Cli(db_url, directory / f"{sim}.json", path)


def vm(
    vm_id: str,
    host: str,
    *,
    ha: bool = True,
    state: str = "Running",
    memory: int = 2048,
) -> dict[str, Any]:
    return {
        "id": vm_id,
        "name": f"vm-{vm_id}",
        "host": host,
        "ha": ha,
        "state": state,
        "memory_mb": memory,
    }


def scenario(
    *vms: dict[str, Any], hosts: int = 3, memory: int = 4 * H, cluster: str = "c1"
) -> dict[str, Any]:
    return {
        "clusters": [
            {
                "name": cluster,
                "hosts": [{"name": f"hv{i + 1}", "memory_mb": memory} for i in range(hosts)],
            }
        ],
        "vms": list(vms),
    }


def placement(sim: SimulatedCluster) -> dict[str, tuple[str, str]]:
    """VM id -> (host, power state)."""
    return {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}


def maintenance(sim: SimulatedCluster) -> dict[str, bool]:
    return {h["name"]: h["maintenance"] for c in sim.snapshot()["clusters"] for h in c["hosts"]}


def operations(counts: Mapping[str, int]) -> dict[str, int]:
    """The per-target counts of operations that change the cluster (polls and reads left out)."""
    keep = MUTATING_OPS + EFFECT_OPS
    return {k: v for k, v in counts.items() if ":" in k and k.split(":", 1)[0] in keep}


def submissions(counts: Mapping[str, int]) -> int:
    """How many mutating requests the cluster accepted."""
    return sum(counts.get(op, 0) for op in MUTATING_OPS)


# ---- the database, read directly -----------------------------------------------------------


@contextmanager
def store(db_url: str) -> Iterator[Store]:
    engine = db.connect(db_url)
    try:
        yield Store(engine)
    finally:
        engine.dispose()


def store_get(db_url: str, run_id: str) -> Run:
    with store(db_url) as s:
        return s.get(run_id)


def only_run(db_url: str) -> Run:
    with store(db_url) as s:
        runs = s.runs()
    assert len(runs) == 1, [r.id for r in runs]
    return runs[0]


def transitions(events: list[Event]) -> list[tuple[str | None, str | None]]:
    return [(e.from_state, e.to_state) for e in events if e.kind == "transition"]


# ---- processes -------------------------------------------------------------------------------


def resume_until_settled(
    cli: Cli, run_id: str, *, deadline_s: float = 60, first_wait_s: float = 0.0
) -> Result:
    """`resume` in new processes while it exits 4 (busy: a crashed holder's lease is still
    live), until it gives another answer."""
    time.sleep(first_wait_s)
    stop = time.monotonic() + deadline_s
    while True:
        result = cli("resume", run_id, "--json")
        if result.code != EXIT_BUSY or time.monotonic() > stop:
            return result
        time.sleep(LEASE_TTL_S / 3)


@dataclass
class Spawned:
    """A `nodepatch` process started in the background."""

    proc: subprocess.Popen[str]

    def wait(self, timeout: float = 120) -> Result:
        out, err = self.proc.communicate(timeout=timeout)
        return Result(self.proc.returncode, out, err)


def spawn(cli: Cli, *args: str, env: Mapping[str, str] | None = None) -> Spawned:
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli.environ(env),
    )
    return Spawned(proc)


def wait_for(predicate: Any, *, timeout: float = 30, interval: float = 0.02) -> None:
    stop = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > stop:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(interval)
