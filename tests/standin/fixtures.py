"""pytest fixtures for the Windows stand-in.

Register them globally with `pytest_plugins = ["tests.standin.fixtures"]` in the root
conftest, or import them into a test module (`from tests.standin.fixtures import rig`).

- `standin_sim`: a SimulatedCluster file (3 hosts hv01..hv03, 12 VMs of which 2 non-HA and 1
  stopped HA, cluster "cluster1", speed 0) at `tmp_path / "sim.json"`.
- `rig`: a running stand-in answering from `standin_sim`, as a `Rig`: `rig.sim`, `rig.sim_path`,
  `rig.world` (stand-in knobs: `reboot_drops`, `vmm_module`, `wu_polls`, `wu_result`),
  `rig.calls` (every command received), `rig.settings(computer)` (ConnectionSettings for that
  endpoint, e.g. "vmm01" for VMM or "hv01" for a node), `rig.port(computer)`,
  `rig.url(computer)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standin import build, dispatch, server, settings_for, world
from workflows.backends import connection, simulated

VMM_SERVER = "vmm01"


@dataclasses.dataclass
class Rig:
    sim: simulated.SimulatedCluster
    sim_path: Path
    standin: server.StandIn
    world: world.World

    @property
    def calls(self) -> list[dispatch.Call]:
        return self.standin.dispatcher.calls

    def port(self, computer: str = VMM_SERVER) -> int:
        return self.standin.endpoint(computer).port

    def url(self, computer: str = VMM_SERVER) -> str:
        return f"http://127.0.0.1:{self.port(computer)}/wsman"

    def settings(
        self, computer: str = VMM_SERVER, **overrides: Any
    ) -> connection.ConnectionSettings:
        return settings_for(self.standin, computer, **overrides)

    def commands(self, name: str) -> list[dispatch.Call]:
        return self.standin.dispatcher.commands(name)


def addresses(rig: Rig, nodes: tuple[str, ...] = ("hv01", "hv02", "hv03")) -> dict[str, str]:
    """node_addresses for the stand-in's node endpoints (127.0.0.1:port each)."""
    return {n: f"127.0.0.1:{rig.port(n)}" for n in nodes}


@pytest.fixture
def standin_sim(tmp_path: Path) -> simulated.SimulatedCluster:
    """A 3-host, 12-VM simulated cluster (2 non-HA, 1 stopped HA), zero latency."""
    return simulated.SimulatedCluster.generate(
        tmp_path / "sim.json", hosts=3, vms=12, non_ha=2, stopped_ha=1, seed=7
    )


@pytest.fixture
def rig(standin_sim: simulated.SimulatedCluster) -> Iterator[Rig]:
    """A running stand-in on 127.0.0.1 answering from `standin_sim`."""
    standin, w = build(standin_sim)
    try:
        yield Rig(standin_sim, standin_sim.path, standin, w)
    finally:
        standin.stop()
