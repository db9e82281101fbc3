"""The health gate after each node: the node is back and placeable, every VM of its snapshot is
home in its original power state, the operator's own check passes. A failed gate is a failed
node. `checks` is pure; `run_health_check` runs the operator's command (bounded, output kept)."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workflows import plan as planning
from workflows.backends.base import HostState, Inventory

OUTPUT_LIMIT = 4000


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def checks(inventory: Inventory, node: str, snapshot: planning.Plan) -> list[Check]:
    out = []
    host = inventory.host(node)
    if host is None:
        out.append(Check("node", False, f"{node} is no longer in cluster {inventory.cluster}"))
    else:
        placeable = (
            host.state is HostState.UP and not host.maintenance and host.available_for_placement
        )
        detail = (
            "up and available for placement"
            if placeable
            else (
                f"{host.state.value}{', in maintenance' if host.maintenance else ''}"
                f"{'' if host.available_for_placement else ', not available for placement'}"
            )
        )
        out.append(Check("node", placeable, detail))
    away = []
    for planned in snapshot.vms:
        vm = inventory.vm(planned.id)
        if vm is None:
            away.append(f"{planned.name!r} ({planned.id}) was deleted")
        elif vm.host.lower() != node.lower():
            away.append(f"{planned.name!r} ({planned.id}) is on {vm.host}")
        elif str(vm.state) != planned.state:
            away.append(f"{planned.name!r} ({planned.id}) is {vm.state}, was {planned.state}")
    count = len(snapshot.vms)
    out.append(
        Check(
            "vms home",
            not away,
            "; ".join(away) if away else f"all {count} VM(s) home in their power state",
        )
    )
    down = [h.name for h in inventory.hosts if h.state is HostState.DOWN]
    out.append(
        Check(
            "cluster",
            not down,
            f"node(s) down: {', '.join(down)}" if down else "every node responds",
        )
    )
    return out


def unexpected(result: Mapping[str, Any]) -> list[str]:
    """What in a gate result is a change to the cluster nobody in this cycle made."""
    return [
        str(c["detail"])
        for c in result.get("checks", [])
        if not c["ok"] and c["name"] in ("vms home", "cluster")
    ]


def run_health_check(command: str, env: Mapping[str, str], timeout_s: float) -> Check:
    """The operator's command (no shell: split like a shell would), with the node in its
    environment; exit 0 passes. Its output is kept, trimmed."""
    try:
        done = subprocess.run(
            shlex.split(command),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check("health check", False, f"{command!r} ran past its {timeout_s:g}s timeout")
    except OSError as exc:
        return Check("health check", False, f"{command!r} could not run: {exc.strerror}")
    output = (done.stdout + done.stderr)[-OUTPUT_LIMIT:].strip()
    verdict = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return Check("health check", done.returncode == 0, f"{verdict}: {output}".rstrip(": "))
