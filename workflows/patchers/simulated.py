"""The simulated patcher: "patches" a drained node of a SimulatedCluster by rebooting it."""

from __future__ import annotations

from workflows.backends import base
from workflows.backends import simulated as sim


class SimulatedPatcher:
    """Implements `patchers.base.Patcher` over the simulator's `reboot_host` job.

    The job installs a deterministic set of KBs for `patch_seconds` (simulated; None: the
    host's own patch time, else 60 s), then the host reboots (not responding, for the host's own
    reboot time, else 120 s) and comes back Up. Its details carry `kbs`, `reboot` and `host`.
    """

    name = "simulated"

    def __init__(
        self, cluster: sim.SimulatedCluster, *, patch_seconds: float | None = None
    ) -> None:
        self._cluster = cluster
        self._patch_seconds = patch_seconds

    def begin(self, host: str) -> str:
        return self._cluster.reboot_host(host, patch_seconds=self._patch_seconds)

    def poll(self, ref: str) -> base.Job:
        return self._cluster.job(ref)

    def find(self, host: str) -> str | None:
        """Patch work on host to re-attach to: still running, or already done in this
        maintenance window (then it must not be done twice)."""
        return self._cluster.find_job("reboot_host", host) or self._cluster.reboot_in_maintenance(
            host
        )
