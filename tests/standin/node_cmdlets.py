"""Node-side commands: LastBootUpTime, Restart-Computer and the Windows Update task scripts.

The endpoint's computer name is the node. `Restart-Computer` starts the simulator's
`reboot_host` job (the host must be in maintenance, as the simulator insists); from then on the
node's endpoint drops connections (`World.reboot_drops` times at least) until the job is done,
and LastBootUpTime moves to the moment it came back. The Windows Update task reports Running for
`World.wu_polls` status polls, then its JSON result (`World.wu_result`, or the simulator's KBs
for the host with RebootRequired). Documented behaviour it plays: `Microsoft.Update.SystemInfo`
RebootRequired (`RebootPending`) stays true once an install needs a reboot, until the node
restarts; a task that ended without writing its result is `Ready` with its `LastTaskResult`
(`World.wu_task_exit`); `World.wu_drop_polls` status polls during the install lose their
connection (a node busy installing).
"""

from __future__ import annotations

import json
from typing import Any

from tests.standin import dispatch
from tests.standin.world import NodeState, World
from workflows.backends import simulated
from workflows.patchers import configmgr, remote

OS_TYPE = "Microsoft.Management.Infrastructure.CimInstance#root/cimv2/Win32_OperatingSystem"


class NodeCmdlets:
    def __init__(self, world: World) -> None:
        self.w = world

    def handlers(self) -> dict[str, dispatch.Handler]:
        return {
            "Get-CimInstance": self.get_cim,
            "Restart-Computer": self.restart,
            "Get-CimClass": self.get_cim_class,
        }

    def get_cim_class(self, inv: dispatch.Invocation) -> list[Any]:
        """The ConfigMgr client's classes in root\\ccm\\ClientSDK (when it is installed)."""
        if not self.w.cm_client:
            raise dispatch.Terminating("Invalid namespace", "ObjectNotFound")
        names = ["CCM_SoftwareUpdate", "CCM_SoftwareUpdatesManager", "CCM_ClientUtilities"]
        return [
            {"__type__": "Microsoft.Management.Infrastructure.CimClass", "CimClassName": n}
            for n in names
        ]

    def scripts(self) -> dict[str, dispatch.Handler]:
        return {
            remote.WU_START_SCRIPT: self.wu_start,
            remote.WU_STATUS_SCRIPT: self.wu_status,
            configmgr.CM_START_SCRIPT: self.cm_start,
            configmgr.CM_STATUS_SCRIPT: self.cm_status,
        }

    # -- ConfigMgr client (root\ccm\ClientSDK) -------------------------------------------------

    def _ccm(self, inv: dispatch.Invocation) -> NodeState:
        if str(inv.get("Namespace")).lower() != "root\\ccm\\clientsdk":
            raise dispatch.Terminating("Invalid namespace", "ObjectNotFound")
        if not self.w.cm_client:
            raise dispatch.Terminating(
                "Invalid namespace 'root\\ccm\\ClientSDK' (no ConfigMgr client)", "ObjectNotFound"
            )
        node = self.w.node(inv.ctx.computer)
        if node.cm_updates is None:  # deployed to the node, still missing
            node.cm_updates = [dict(u, polls=0) for u in self.w.cm_deployed]
        return node

    def cm_start(self, inv: dispatch.Invocation) -> list[Any]:
        """InstallUpdates on the missing updates: each goes through its `states`."""
        node = self._ccm(inv)
        missing = [u for u in node.cm_updates or [] if u["compliance"] == 0]
        for update in missing:
            update["submitted"] = True
        return [{"Article": "KB" + u["article"]} for u in missing]

    def cm_status(self, inv: dispatch.Invocation) -> list[Any]:
        """One object per CCM_SoftwareUpdate (EvaluationState advancing one step per poll once
        submitted), then DetermineIfRebootPending."""
        node = self._ccm(inv)
        out: list[Any] = []
        for update in node.cm_updates or []:
            state = 1
            if update.get("submitted"):
                update["polls"] += 1
                states = update["states"]
                state = states[min(update["polls"], len(states)) - 1]
                if state in (8, 9, 10):
                    node.reboot_pending = True
            error = update.get("error", 0) if state == 13 else 0
            out.append(
                {
                    "Kind": "Update",
                    "Article": "KB" + update["article"],
                    "State": state,
                    "Compliance": update["compliance"],
                    "ErrorCode": error,
                }
            )
        out.append({"Kind": "Reboot", "RebootPending": node.reboot_pending})
        return out

    def get_cim(self, inv: dispatch.Invocation) -> list[Any]:
        if str(inv.get("ClassName")).lower() != "win32_operatingsystem":
            raise dispatch.Terminating(
                "stand-in knows only Win32_OperatingSystem", "NotImplemented"
            )
        node = self.w.node(inv.ctx.computer)
        return [{"__type__": OS_TYPE, "CSName": inv.ctx.computer, "LastBootUpTime": node.boot_time}]

    def restart(self, inv: dispatch.Invocation) -> list[Any]:
        host = inv.ctx.computer
        job_id = self.w.call(lambda: self.w.sim.reboot_host(host, patch_seconds=0.0), inv.name)
        node = self.w.node(host)
        node.reboot_job = job_id
        node.drops_left = self.w.reboot_drops
        return []

    def wu_start(self, inv: dispatch.Invocation) -> list[Any]:
        if inv.get("TaskScript") != remote.WU_TASK_SCRIPT:
            raise dispatch.Terminating("unexpected task script", "InvalidArgument")
        self.w.node(inv.ctx.computer).wu_runs[str(inv.get("TaskName"))] = 0
        return []

    def wu_status(self, inv: dispatch.Invocation) -> list[Any]:
        node = self.w.node(inv.ctx.computer)
        runs = node.wu_runs
        task = str(inv.get("TaskName"))
        pending = node.reboot_pending
        if task not in runs:
            return [_status("Missing", None, None, pending)]
        runs[task] += 1
        if runs[task] <= self.w.wu_polls:
            if runs[task] > 1 and self.w.wu_drop_polls > 0:
                self.w.wu_drop_polls -= 1
                raise dispatch.DropConnection
            return [_status("Running", None, TASK_RUNNING, pending)]
        if self.w.wu_task_exit is not None:
            return [_status("Ready", None, self.w.wu_task_exit, pending)]
        result = self.w.wu_result or {
            "Status": "Succeeded",
            "Installed": simulated.kbs_for(inv.ctx.computer).split(","),
            "RebootRequired": True,
            "HResult": 0,
            "Message": "",
        }
        if result.get("RebootRequired"):
            node.reboot_pending = True
        text = "\ufeff" + json.dumps(result)
        return [_status("Ready", text, 0, node.reboot_pending)]


TASK_RUNNING = 0x41301


def _status(state: str, result: str | None, last: int | None, pending: bool) -> dict[str, Any]:
    return {"TaskState": state, "Result": result, "LastTaskResult": last, "RebootPending": pending}
