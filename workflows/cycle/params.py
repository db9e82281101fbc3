"""What a cycle was started with, recorded in the run so that a resume does the same thing."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from engine import errors
from engine.model import Run
from workflows import plan as planning
from workflows.cycle.waves import Order
from workflows.cycle.windows import Schedule

CLUSTER_CYCLE = "cluster_cycle"


class OnNodeFailure(enum.StrEnum):
    COMPENSATE = "compensate"  # abort the failed node's run: out of maintenance, VMs home
    LEAVE = "leave"  # leave it as it is; the capacity check counts it as gone


@dataclass(frozen=True)
class CycleParams:
    cluster: str
    order: list[str]
    max_parallel: int | None = 1  # None: auto
    max_failed_nodes: int = 0
    retries_per_node: int = 1
    soak_s: float = 0.0
    windows: list[str] = field(default_factory=list)
    stop_after_s: float | None = None
    health_check: str | None = None
    health_timeout_s: float = 300.0
    pre_node_script: str | None = None
    post_node_script: str | None = None
    on_node_failure: str = OnNodeFailure.COMPENSATE.value
    non_ha: str = planning.NonHaPolicy.BLOCK.value
    stopped_ha: str = planning.StoppedHaPolicy.LEAVE.value
    patcher: str = "simulated"
    concurrency: int = 2
    headroom: float = 0.1
    until_node: str | None = None
    poll_s: float = 5.0
    default_node_s: float = 3600.0
    order_by: str = Order.FEWEST_VMS.value
    storage_timeout_s: float = 7200.0

    @property
    def policies(self) -> planning.Policies:
        return planning.Policies(
            planning.NonHaPolicy(self.non_ha), planning.StoppedHaPolicy(self.stopped_ha)
        )

    @property
    def schedule(self) -> Schedule:
        return Schedule.parse(self.windows)

    @property
    def leaves_failed_nodes(self) -> bool:
        return self.on_node_failure == OnNodeFailure.LEAVE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_run(cls, run: Run) -> CycleParams:
        return cls.from_json(run.params)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CycleParams:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def node_params(
        self, node: str, away: Sequence[str], targets: Mapping[str, str]
    ) -> dict[str, Any]:
        """The params of one node's node-patch run (see workflows.node_patch.Params)."""
        out: dict[str, Any] = {
            "cluster": self.cluster,
            "node": node,
            "non_ha": self.non_ha,
            "stopped_ha": self.stopped_ha,
            "patcher": self.patcher,
            "concurrency": self.concurrency,
        }
        if away:
            out["away"] = sorted(away)
            out["targets"] = dict(targets)
        return out


def check(params: CycleParams) -> None:
    """Refuse options that cannot work, naming the option (exit 2)."""
    if params.max_parallel is not None and params.max_parallel < 1:
        raise errors.UsageError("--max-parallel: must be a positive number or auto")
    if params.max_failed_nodes < 0:
        raise errors.UsageError("--max-failed-nodes: must be 0 or more")
    if params.retries_per_node < 0:
        raise errors.UsageError("--retries-per-node: must be 0 or more")
    if params.soak_s < 0:
        raise errors.UsageError("--soak: must not be negative")
    if not 0 <= params.headroom < 1:
        raise errors.UsageError("cycle.headroom_percent: must be between 0 and 99")
    try:
        OnNodeFailure(params.on_node_failure)
    except ValueError:
        raise errors.UsageError("--on-node-failure: must be compensate or leave") from None
    Schedule.parse(params.windows, "--window")  # names a bad window
    if params.until_node and params.until_node not in params.order:
        raise errors.UsageError(
            f"--until-node: {params.until_node!r} is not one of the cycle's nodes "
            f"({', '.join(params.order)})"
        )
