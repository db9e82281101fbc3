"""The crash matrix through the VMM backend over real WSMan (the stand-in).

Every crash point that an uninterrupted VMM run passes is traced per process (the run is split
Opalis-style: `start` drains and waits for `patched`, `resume` finishes). Each point is then
killed in its process with os._exit, and new processes carry the run on. The run must end as
if never interrupted: Done, same transitions, same placement, and every VMM operation exactly
once (Disable-SCVMHost, each Move-SCVirtualMachine, each power action).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine import db
from tests import durability as d
from tests.clitools import Cli, Result
from tests.standin import build
from tests.standin.fixtures import Rig
from tests.test_crash_matrix import addresses
from tests.test_vmm_e2e import vmm_backend
from workflows.backends.simulated import SimulatedCluster

PASSWORD = "crash-matrix-pass"  # the stand-in's credential for these tests
NODES = ("hv1", "hv2", "hv3")
VMS = (  # VMM identifies VMs by GUID
    d.vm("00000000-0000-4000-8000-0000000000a1", "hv1"),
    d.vm("00000000-0000-4000-8000-0000000000b1", "hv1", ha=False),
    d.vm("00000000-0000-4000-8000-0000000000c1", "hv1", state="PowerOff"),
    d.vm("00000000-0000-4000-8000-0000000000d1", "hv2"),
)
FLAGS = ("--non-ha", "migrate", "--stopped-ha", "evacuate")


class VmmCli(Cli):
    """The CLI configured for the VMM backend; the password comes from the environment."""

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> Result:
        base = {"NODEPATCH_SIM": "", "NODEPATCH_VMM_PASSWORD": PASSWORD}
        return super().__call__(*args, env=base | (env or {}), timeout=timeout)


_ALEMBIC = threading.Lock()


@contextmanager
def vmm_case(root: Path, db_url: str) -> Iterator[tuple[VmmCli, Rig]]:
    """A fresh database and simulated cluster behind its own stand-in, and a CLI for them."""
    root.mkdir(parents=True)
    with _ALEMBIC:  # alembic's environment is module-global: one migration at a time
        engine = db.connect(db_url, create=True)
        db.upgrade(engine)
        engine.dispose()
    sim = SimulatedCluster.create(root / "sim.json", d.scenario(*VMS))
    standin, world = build(sim, password=PASSWORD)
    rig = Rig(sim, sim.path, standin, world)
    try:
        config = {
            "backend": vmm_backend(rig),
            "patcher": {"kind": "external"},
            "engine": {"poll_interval_s": 0.01, "lease_ttl_s": d.LEASE_TTL_S},
            "retries": {"attempts": 5, "backoff_s": 0.05, "backoff_max_s": 0.2},
        }
        (root / "vmm.yaml").write_text(json.dumps(config), encoding="utf-8")
        yield VmmCli(db_url, root / "unused.json", root / "vmm.yaml"), rig
    finally:
        standin.stop()


@dataclass(frozen=True)
class Outcome:
    traces: tuple[list[str], ...]
    placement: dict[str, tuple[str, str]]
    operations: dict[str, int]
    transitions: list[tuple[str | None, str | None]]


def drive(
    cli: VmmCli, *, crash: tuple[int, str] | None = None, traces: Path | None = None
) -> tuple[str, bool]:
    """start, signal `patched` when waiting, resume until Done. Process number crash[0] (0 is
    `start`) is killed at point crash[1]. Returns the run ID and whether the kill happened."""
    crashed, index = False, 0

    def env() -> dict[str, str]:
        out = {}
        if traces is not None:
            out["NODEPATCH_CRASH_TRACE"] = str(traces / f"{index}.trace")
        if crash is not None and crash[0] == index and not crashed:
            out["NODEPATCH_CRASH_AT"] = crash[1]
        return out

    result = cli("start", "--cluster", "c1", "--node", "hv1", *FLAGS, "--json", env=env())
    run_id = d.only_run(cli.db_url).id
    for _ in range(60):
        if result.code == d.CRASH_EXIT:
            crashed = True
            time.sleep(d.LEASE_TTL_S)
        elif result.code == d.EXIT_BUSY:
            time.sleep(d.LEASE_TTL_S / 3)
        elif result.code == 0:
            return run_id, crashed
        elif result.code == 3:
            run = d.only_run(cli.db_url)
            if run.waiting_for == "patched":
                assert cli("signal", run_id, "patched").code == 0
        else:
            raise AssertionError(f"exit {result.code}: {result.err}")
        index += result.code != d.EXIT_BUSY
        result = cli("resume", run_id, "--json", env=env())
    raise AssertionError("the run did not settle")


def observe(cli: VmmCli, rig: Rig, run_id: str) -> tuple[Any, ...]:
    with d.store(cli.db_url) as s:
        events = s.events(run_id)
    return d.placement(rig.sim), d.operations(rig.sim.counts()), d.transitions(events)


@pytest.mark.slow
def test_crash_at_every_point_of_a_vmm_run_then_resume_ends_as_if_uninterrupted(
    tmp_path: Path,
) -> None:
    """Killed at any traced point (on SQLite), the run carried on by new processes over WSMan
    ends exactly like the uninterrupted one, every VMM operation done once."""

    def url(name: str) -> str:
        return f"sqlite:///{tmp_path / name / 'nodepatch.db'}"

    traces = tmp_path / "traces"
    traces.mkdir()
    with vmm_case(tmp_path / "base", url("base")) as (cli, rig):
        run_id, _ = drive(cli, traces=traces)
        placement, operations, transitions = observe(cli, rig, run_id)
    per_process = [(t.read_text(encoding="utf-8").split()) for t in sorted(traces.glob("*.trace"))]
    cases = [(i, point) for i, trace in enumerate(per_process) for point in addresses(trace)]
    assert len(cases) > 30

    def one(item: tuple[int, tuple[int, str]]) -> str | None:
        n, crash = item
        with vmm_case(tmp_path / f"k{n}", url(f"k{n}")) as (kcli, krig):
            try:
                kid, crashed = drive(kcli, crash=crash)
            except AssertionError as exc:
                return str(exc)
            got = observe(kcli, krig, kid)
        problems = [] if crashed else ["the process did not die at the point"]
        for what, mine, ref in zip(
            ("placement", "operations", "transitions"),
            got,
            (placement, operations, transitions),
            strict=True,
        ):
            if mine != ref:
                problems.append(f"{what}: {mine} != {ref}")
        return "; ".join(problems) or None

    with ThreadPoolExecutor(max_workers=6) as pool:
        found = list(pool.map(one, enumerate(cases)))
    problems = [f"{c}: {p}" for c, p in zip(cases, found, strict=True) if p]
    assert not problems, f"{len(problems)} of {len(cases)} points:\n" + "\n".join(problems)
