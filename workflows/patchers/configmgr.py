"""`configmgr`: patch a node through its Configuration Manager (SCCM) client.

On the node, over its own PSRP session, through the client's CIM classes in `root\\ccm\\ClientSDK`:
`CCM_SoftwareUpdate` lists the updates deployed to the node (`ComplianceState` 0: missing),
`CCM_SoftwareUpdatesManager.InstallUpdates` starts installing them, each update's
`EvaluationState` tells how far it got, and `CCM_ClientUtilities.DetermineIfRebootPending` says
whether the node must restart. The client installs as SYSTEM itself, so no scheduled task is
needed. A reboot is reported as `reboot: pending` and done by node_patch as a journaled job of
its own (`reboot`), like the windows-update patcher. `find` re-attaches to an install still in
progress, or to one that finished with a reboot pending.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine import errors
from workflows.backends import base, psrp
from workflows.patchers import remote

NAMESPACE = "root\\ccm\\ClientSDK"

# CCM_SoftwareUpdate.EvaluationState (ConfigMgr client SDK documentation)
INSTALLED_STATES = frozenset({8, 9, 10, 12})  # pending soft/hard reboot, wait reboot, complete
REBOOT_STATES = frozenset({8, 9, 10})
ERROR_STATE = 13
NOT_STARTED_STATES = frozenset({0, 1})  # none, available
# States that wait for something a drained, unattended node will not give: fail at once.
STUCK_STATES = frozenset({14, 15, 16, 17, 18, 19, 22})
STATE_NAMES = {
    0: "None",
    1: "Available",
    2: "Submitted",
    3: "Detecting",
    4: "PreDownload",
    5: "Downloading",
    6: "WaitInstall",
    7: "Installing",
    8: "PendingSoftReboot",
    9: "PendingHardReboot",
    10: "WaitReboot",
    11: "Verifying",
    12: "InstallComplete",
    13: "Error",
    14: "WaitServiceWindow",
    15: "WaitUserLogon",
    16: "WaitUserLogoff",
    17: "WaitJobUserLogon",
    18: "WaitUserReconnect",
    19: "PendingUserLogoff",
    20: "PendingUpdate",
    21: "WaitingRetry",
    22: "WaitPresModeOff",
    23: "WaitForOrchestration",
}

CM_START_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [string] $Namespace
)
$ErrorActionPreference = 'Stop'
$missing = @(Get-CimInstance -Namespace $Namespace -ClassName CCM_SoftwareUpdate |
    Where-Object { $_.ComplianceState -eq 0 })
if ($missing.Count -gt 0) {
    $install = @{
        Namespace = $Namespace
        ClassName = 'CCM_SoftwareUpdatesManager'
        MethodName = 'InstallUpdates'
        Arguments = @{ CCMUpdates = [ciminstance[]]$missing }
    }
    $null = Invoke-CimMethod @install
}
foreach ($update in $missing) {
    [pscustomobject]@{
        Article = 'KB' + $update.ArticleID
    }
}
"""

CM_STATUS_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [string] $Namespace
)
$ErrorActionPreference = 'Stop'
foreach ($update in Get-CimInstance -Namespace $Namespace -ClassName CCM_SoftwareUpdate) {
    [pscustomobject]@{
        Kind = 'Update'
        Article = 'KB' + $update.ArticleID
        State = [int]$update.EvaluationState
        Compliance = [int]$update.ComplianceState
        ErrorCode = [int64]$update.ErrorCode
    }
}
$query = @{
    Namespace = $Namespace
    ClassName = 'CCM_ClientUtilities'
    MethodName = 'DetermineIfRebootPending'
}
$reboot = Invoke-CimMethod @query
[pscustomobject]@{
    Kind = 'Reboot'
    RebootPending = [bool]$reboot.RebootPending -or [bool]$reboot.IsHardRebootPending
}
"""


class ConfigMgrPatcher(remote._NodePatcher):
    """`configmgr`: install the updates ConfigMgr deployed to the node, then reboot if pending."""

    name = "configmgr"

    def begin(self, host: str) -> str:
        boot = self.boot_time(host)
        self._run(host, [psrp.Cmd(CM_START_SCRIPT, {"Namespace": NAMESPACE}, script=True)])
        return remote.Ref(host, self.name, boot, self.clock()).dump()

    def find(self, host: str) -> str | None:
        """An install still in progress, or finished with a reboot pending."""
        updates, pending = self._status(host)
        started = any(_busy(u) and _state(u) not in NOT_STARTED_STATES for u in updates)
        if not started and not pending:
            return None
        return remote.Ref(host, self.name, self.boot_time(host), self.clock()).dump()

    def poll(self, ref: str) -> base.Job:
        r = remote.Ref.load(ref)
        if r.restart_at is not None:
            return self.wait_for_reboot(ref, r, r.restart_at, {"reboot": "true"})
        if self.clock() - r.started > self.settings.install_timeout_s:
            return base.Job(ref, base.JobStatus.FAILED, 100, f"patching {r.host} timed out")
        try:
            updates, pending = self._status(r.host)
        except (errors.TransientBackendError, errors.AuthenticationFailed) as exc:
            text = f"installing updates on {r.host}; it is not answering ({exc})"
            return base.Job(ref, base.JobStatus.RUNNING, 30, text, {"host": r.host})
        busy = [u for u in updates if _busy(u)]
        if busy:
            states = ", ".join(f"{u['Article']} {_state_name(u)}" for u in busy)
            done = len(updates) - len(busy)
            progress = 30 + (60 * done) // max(len(updates), 1)
            text = f"installing updates on {r.host}: {states}"
            return base.Job(ref, base.JobStatus.RUNNING, progress, text, {"host": r.host})
        return self._finished(ref, r, updates, pending)

    def _finished(
        self, ref: str, r: remote.Ref, updates: Sequence[Mapping[str, Any]], pending: bool
    ) -> base.Job:
        installed = [str(u["Article"]) for u in updates if _state(u) in INSTALLED_STATES]
        failed = [u for u in updates if _state(u) in (ERROR_STATE, *STUCK_STATES)]
        details = {
            "host": r.host,
            "kbs": ",".join(installed),
            "failed": ",".join(str(u["Article"]) for u in failed),
            "reboot": "false",
        }
        if failed:
            reasons = "; ".join(_why(u) for u in failed)
            text = f"ConfigMgr could not install on {r.host}: {reasons}"
            return base.Job(ref, base.JobStatus.FAILED, 100, text, details)
        if pending or any(_state(u) in REBOOT_STATES for u in updates):
            details["reboot"] = remote.REBOOT_PENDING
            text = f"updates installed on {r.host}; a reboot is pending"
            return base.Job(ref, base.JobStatus.COMPLETED, 100, text, details)
        text = f"{r.host} patched (no reboot needed)"
        return base.Job(ref, base.JobStatus.COMPLETED, 100, text, details)

    def _status(self, host: str) -> tuple[list[dict[str, Any]], bool]:
        cmd = psrp.Cmd(CM_STATUS_SCRIPT, {"Namespace": NAMESPACE}, script=True)
        rows = [psrp.props(r) for r in self._run(host, [cmd], probe=True)]
        updates = [r for r in rows if r.get("Kind") == "Update"]
        pending = any(bool(r.get("RebootPending")) for r in rows if r.get("Kind") == "Reboot")
        return updates, pending


def _state(update: Mapping[str, Any]) -> int:
    try:
        return int(update.get("State") or 0)
    except (TypeError, ValueError):
        return -1


def _state_name(update: Mapping[str, Any]) -> str:
    return STATE_NAMES.get(_state(update), f"state {_state(update)}")


def _why(update: Mapping[str, Any]) -> str:
    if _state(update) == ERROR_STATE:
        code = int(update.get("ErrorCode") or 0) & 0xFFFFFFFF
        return f"{update['Article']} (error 0x{code:08X})"
    return f"{update['Article']} ({_state_name(update)}: waits for what a drained node cannot give)"


def _busy(update: Mapping[str, Any]) -> bool:
    """Submitted, downloading, installing, verifying; or still missing and not started yet."""
    state = _state(update)
    if state in INSTALLED_STATES or state == ERROR_STATE or state in STUCK_STATES:
        return False
    if state in NOT_STARTED_STATES:
        return int(update.get("Compliance") or 0) == 0
    return True
