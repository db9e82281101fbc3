"""Patchers that work on the node itself over its own PSRP connection.

- `windows-update`: the Windows Update API refuses to install from a remote (network) logon, so
  a one-shot scheduled task running as SYSTEM searches, downloads and installs the applicable
  updates and writes a JSON result on the node; `poll` reads it, reboots the node if the result
  says so, and waits for it to come back.
- `script`: runs the operator's PowerShell file (read locally; the operator's own constant
  script) in the node's session with the configured parameters, then reboots per `reboot`.
- `reboot`: just reboots.

A reference (`begin`'s return, journaled by the engine) is JSON holding everything `poll` needs
after a crash: host, patcher, boot time before, start time. Reboot-and-wait: record
LastBootUpTime, `Restart-Computer -Force`, then poll with fresh connections and short timeouts;
connection and authentication errors mean "not back yet". Done when LastBootUpTime changed and
the cluster backend reports the host Up; past `reboot_timeout_s` the job ends Failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from engine import errors
from workflows.backends import base, psrp
from workflows.backends import connection as conn

Clock = Callable[[], float]

# -- constant remote scripts (values travel as parameters; see tests/test_powershell_lint.py) --

WU_START_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [string] $TaskName,
    [Parameter(Mandatory = $true)] [string] $TaskScript,
    [Parameter(Mandatory = $true)] [string] $Criteria
)
$ErrorActionPreference = 'Stop'
$dir = Join-Path -Path $env:ProgramData -ChildPath 'nodepatch'
$null = New-Item -ItemType Directory -Force -Path $dir
$scriptPath = Join-Path -Path $dir -ChildPath 'wu-task.ps1'
Remove-Item -Path (Join-Path -Path $dir -ChildPath 'wu-result.json') -ErrorAction SilentlyContinue
Set-Content -Path $scriptPath -Value $TaskScript -Encoding UTF8
$config = [pscustomobject]@{ Criteria = $Criteria }
$configPath = Join-Path -Path $dir -ChildPath 'wu-config.json'
$config | ConvertTo-Json | Set-Content -Path $configPath -Encoding UTF8
$arguments = '-NoProfile -ExecutionPolicy Bypass -File "{0}"' -f $scriptPath
$action = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument $arguments
$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
$null = Register-ScheduledTask -TaskName $TaskName -Action $action -Principal $principal -Force
Start-ScheduledTask -TaskName $TaskName
"""

WU_STATUS_SCRIPT = """\
param(
    [Parameter(Mandatory = $true)] [string] $TaskName
)
$dir = Join-Path -Path $env:ProgramData -ChildPath 'nodepatch'
$resultPath = Join-Path -Path $dir -ChildPath 'wu-result.json'
$task = Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
$state = 'Missing'
$lastResult = $null
if ($null -ne $task) {
    $state = [string]$task.State
    $info = Get-ScheduledTaskInfo -TaskName $TaskName -ErrorAction SilentlyContinue
    if ($null -ne $info) {
        $lastResult = [int64]$info.LastTaskResult
    }
}
$result = $null
if (Test-Path -Path $resultPath) {
    $result = Get-Content -Raw -Path $resultPath
}
$pending = $null
try {
    $pending = [bool](New-Object -ComObject Microsoft.Update.SystemInfo).RebootRequired
} catch {
    $pending = $null
}
[pscustomobject]@{
    TaskState = $state
    Result = $result
    LastTaskResult = $lastResult
    RebootPending = $pending
}
"""

# Runs on the node as SYSTEM (not remotely): the Windows Update Agent API is allowed there.
WU_TASK_SCRIPT = """\
param()
$dir = Join-Path -Path $env:ProgramData -ChildPath 'nodepatch'
$configPath = Join-Path -Path $dir -ChildPath 'wu-config.json'
$config = Get-Content -Raw -Path $configPath | ConvertFrom-Json
$systemInfo = New-Object -ComObject Microsoft.Update.SystemInfo
$result = [ordered]@{
    Status = 'Failed'
    Installed = @()
    RebootRequired = $false
    RebootRequiredBefore = [bool]$systemInfo.RebootRequired
    HResult = 0
    Message = ''
    Finished = ''
}
try {
    $session = New-Object -ComObject Microsoft.Update.Session
    $found = $session.CreateUpdateSearcher().Search($config.Criteria).Updates
    $updates = New-Object -ComObject Microsoft.Update.UpdateColl
    foreach ($update in $found) {
        if (-not $update.EulaAccepted) {
            $update.AcceptEula()
        }
        $null = $updates.Add($update)
    }
    $result.Status = 'Succeeded'
    if ($updates.Count -gt 0) {
        $downloader = $session.CreateUpdateDownloader()
        $downloader.Updates = $updates
        $null = $downloader.Download()
        $installer = $session.CreateUpdateInstaller()
        $installer.Updates = $updates
        $outcome = $installer.Install()
        $kbs = @()
        for ($i = 0; $i -lt $updates.Count; $i++) {
            if ($outcome.GetUpdateResult($i).ResultCode -eq 2) {
                $kbs += @($updates.Item($i).KBArticleIDs | ForEach-Object { 'KB' + $_ })
            }
        }
        $result.Installed = $kbs
        $result.HResult = $outcome.HResult
        $result.RebootRequired = [bool]$outcome.RebootRequired
        $codes = @{ 2 = 'Succeeded'; 3 = 'SucceededWithErrors'; 4 = 'Failed'; 5 = 'Aborted' }
        $result.Status = $codes[[int]$outcome.ResultCode]
    }
} catch {
    $result.Status = 'Failed'
    $result.Message = $_.Exception.Message
}
$after = [bool](New-Object -ComObject Microsoft.Update.SystemInfo).RebootRequired
$result.RebootRequired = $result.RebootRequired -or $after -or $result.RebootRequiredBefore
$result.Finished = (Get-Date).ToUniversalTime().ToString('o')
$resultPath = Join-Path -Path $dir -ChildPath 'wu-result.json'
$partial = $resultPath + '.partial'
$result | ConvertTo-Json | Set-Content -Path $partial -Encoding UTF8
Move-Item -Path $partial -Destination $resultPath -Force
"""


TASK_HAS_NOT_RUN = 0x41303  # SCHED_S_TASK_HAS_NOT_RUN
TASK_RUNNING = 0x41301  # SCHED_S_TASK_RUNNING
REBOOT_PENDING = "pending"  # details["reboot"]: installed; node_patch reboots as its own job


@dataclasses.dataclass(frozen=True)
class RemotePatchSettings:
    """How to reach nodes and how long to wait. `connection.server` is replaced by the node."""

    connection: conn.ConnectionSettings
    node_addresses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    reboot_timeout_s: float = 1800.0
    install_timeout_s: float = 14400.0
    probe_timeout_s: float = 5.0
    criteria: str = "IsInstalled=0 and IsHidden=0 and Type='Software'"
    task_name: str = "nodepatch-windows-update"
    script_path: str | None = None
    script_parameters: Mapping[str, object] = dataclasses.field(default_factory=dict)
    reboot: str = "if-required"

    def configured_address(self, host: str) -> str | None:
        return self.node_addresses.get(host) or self.node_addresses.get(host.lower())

    def for_host(
        self, host: str, *, probe: bool = False, address: str | None = None
    ) -> conn.ConnectionSettings:
        """Connection settings for one node (short timeouts when probing during a reboot):
        `node_addresses[host]`, else `address` (the FQDN the cluster reports), else the name."""
        address = self.configured_address(host) or address or host
        server, _, port = address.partition(":")
        values: dict[str, Any] = {"server": server}
        if port:
            values["port"] = int(port)
        if probe:
            t = self.probe_timeout_s
            values.update(connection_timeout_s=t, read_timeout_s=t + 5, operation_timeout_s=t)
        return dataclasses.replace(self.connection, **values)


@dataclasses.dataclass(frozen=True)
class Ref:
    host: str
    patcher: str
    boot_before: str
    started: float
    restart_at: float | None = None

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def load(cls, text: str) -> Ref:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise errors.BackendError(f"not a remote patcher reference: {text!r}") from exc


class _NodePatcher:
    """Reboot-and-wait machinery shared by the three patchers."""

    name = "reboot"

    def __init__(
        self,
        settings: RemotePatchSettings,
        backend: base.ClusterBackend,
        cluster: str,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.cluster = cluster
        self.clock = clock
        self._addresses: dict[str, str] = {}

    # -- remote calls ---------------------------------------------------------------------

    def address(self, host: str) -> str:
        """Where to reach the node: `node_addresses`, else the FQDN the cluster reports (HTTPS
        certificates and Kerberos SPNs name FQDNs), else its name."""
        configured = self.settings.configured_address(host)
        if configured:
            return configured
        if host.lower() not in self._addresses:
            found = self.backend.inventory(self.cluster).host(host)
            self._addresses[host.lower()] = (found.address if found else "") or host
        return self._addresses[host.lower()]

    def _run(self, host: str, cmds: list[psrp.Cmd], *, probe: bool = False) -> list[Any]:
        settings = self.settings.for_host(host, probe=probe, address=self.address(host))
        session = psrp.Session(settings)
        try:
            return session.run(cmds, target=host)
        finally:
            session.close()

    def boot_time(self, host: str, *, probe: bool = False) -> str:
        cmds = [
            psrp.Cmd("Get-CimInstance", {"ClassName": "Win32_OperatingSystem"}),
            psrp.Cmd("Select-Object", {"Property": ["LastBootUpTime"]}),
        ]
        rows = self._run(host, cmds, probe=probe)
        if not rows:
            raise errors.BackendError(f"{host} did not report LastBootUpTime", target=host)
        raw = psrp.props(rows[0]).get("LastBootUpTime")
        if raw is None:
            raise errors.BackendError(f"{host} did not report LastBootUpTime", target=host)
        return raw.isoformat() if hasattr(raw, "isoformat") else str(raw)

    def restart(self, host: str) -> None:
        """Restart-Computer -Force; losing the connection while it goes down is expected."""
        with contextlib.suppress(errors.TransientBackendError):
            self._run(host, [psrp.Cmd("Restart-Computer", {"Force": True})])

    # -- Patcher protocol -----------------------------------------------------------------

    def begin(self, host: str) -> str:
        return self.reboot(host)

    def reboot(self, host: str) -> str:
        """Restart the node now; the reference waits for it to come back."""
        boot = self.boot_time(host)
        now = self.clock()
        self.restart(host)
        return Ref(host, self.name, boot, now, restart_at=now).dump()

    def find(self, host: str) -> str | None:
        """A bare reboot leaves nothing on the node to re-attach to."""
        return None

    def poll(self, ref: str) -> base.Job:
        r = Ref.load(ref)
        return self.wait_for_reboot(ref, r, r.restart_at or r.started, {"reboot": "true"})

    # -- reboot-and-wait ------------------------------------------------------------------

    def wait_for_reboot(
        self, ref: str, r: Ref, restart_at: float, details: dict[str, str]
    ) -> base.Job:
        details = {"host": r.host, **details}
        elapsed = self.clock() - restart_at
        try:
            boot = self.boot_time(r.host, probe=True)
        except (errors.TransientBackendError, errors.AuthenticationFailed) as exc:
            return self._waiting(
                ref, r.host, elapsed, f"{r.host} is not answering yet ({exc})", details
            )
        if boot == r.boot_before:
            return self._waiting(ref, r.host, elapsed, f"waiting for {r.host} to restart", details)
        if not self._cluster_up(r.host):
            text = f"{r.host} restarted; waiting for the cluster to report it Up"
            return self._waiting(ref, r.host, elapsed, text, details)
        return base.Job(
            ref, base.JobStatus.COMPLETED, 100, f"{r.host} patched and back up", details
        )

    def _waiting(
        self, ref: str, host: str, elapsed: float, text: str, details: dict[str, str]
    ) -> base.Job:
        limit = self.settings.reboot_timeout_s
        if elapsed > limit:
            reason = f"{host} did not come back within {limit:.0f} s after the restart: {text}"
            return base.Job(ref, base.JobStatus.FAILED, 100, reason, details)
        return base.Job(ref, base.JobStatus.RUNNING, 90, text, details)

    def _cluster_up(self, host: str) -> bool:
        try:
            found = self.backend.inventory(self.cluster).host(host)
        except errors.TransientBackendError:
            return False
        return found is not None and found.responding


class RebootPatcher(_NodePatcher):
    """`reboot`: restart the node and wait for it."""

    name = "reboot"


class WindowsUpdatePatcher(_NodePatcher):
    """`windows-update`: install applicable updates as SYSTEM via a scheduled task, then reboot."""

    name = "windows-update"

    def begin(self, host: str) -> str:
        boot = self.boot_time(host)
        params = {
            "TaskName": self.settings.task_name,
            "TaskScript": WU_TASK_SCRIPT,
            "Criteria": self.settings.criteria,
        }
        self._run(host, [psrp.Cmd(WU_START_SCRIPT, params, script=True)])
        return Ref(host, self.name, boot, self.clock()).dump()

    def find(self, host: str) -> str | None:
        """The install still running, or finished with a reboot still pending (a crash after
        the result was written must not search again and report "no reboot needed")."""
        status = self._status(host)
        state = status.get("TaskState")
        running = state in ("Running", "Queued") and not status.get("Result")
        pending = bool(status.get("Result")) and bool(status.get("RebootPending"))
        if not running and not pending:
            return None
        return Ref(host, self.name, self.boot_time(host), self.clock()).dump()

    def poll(self, ref: str) -> base.Job:
        """The install only: a reboot it needs is reported as `reboot: pending`, and done as
        a journaled job of its own (`reboot`), never remembered in this process."""
        r = Ref.load(ref)
        if r.restart_at is not None:
            return self.wait_for_reboot(ref, r, r.restart_at, {"reboot": "true"})
        if self.clock() - r.started > self.settings.install_timeout_s:
            return base.Job(ref, base.JobStatus.FAILED, 100, f"patching {r.host} timed out")
        try:
            status = self._status(r.host)
        except (errors.TransientBackendError, errors.AuthenticationFailed) as exc:
            text = f"installing updates on {r.host}; it is not answering ({exc})"
            return base.Job(ref, base.JobStatus.RUNNING, 30, text, {"host": r.host})
        result = _result(status)
        if result is None:
            return self._installing(ref, r, status)
        return self._finished(ref, r, result, bool(status.get("RebootPending")))

    def _finished(self, ref: str, r: Ref, result: Mapping[str, Any], pending_now: bool) -> base.Job:
        details = {"kbs": ",".join(result.get("Installed") or []), "reboot": "false"}
        if result.get("Status") not in ("Succeeded", "SucceededWithErrors"):
            message = result.get("Message") or f"result {result.get('Status')}"
            return base.Job(
                ref,
                base.JobStatus.FAILED,
                100,
                f"Windows Update on {r.host} failed: {message}",
                details,
            )
        if result.get("RebootRequired") or pending_now:
            details["reboot"] = REBOOT_PENDING
            text = f"updates installed on {r.host}; a reboot is pending"
            return base.Job(ref, base.JobStatus.COMPLETED, 100, text, details)
        return base.Job(
            ref, base.JobStatus.COMPLETED, 100, f"{r.host} patched (no reboot needed)", details
        )

    def _status(self, host: str) -> dict[str, Any]:
        params = {"TaskName": self.settings.task_name}
        rows = self._run(host, [psrp.Cmd(WU_STATUS_SCRIPT, params, script=True)], probe=True)
        return psrp.props(rows[0]) if rows else {}

    def _installing(self, ref: str, r: Ref, status: Mapping[str, Any]) -> base.Job:
        state = str(status.get("TaskState"))
        if state in ("Missing", "Disabled"):
            return base.Job(
                ref, base.JobStatus.FAILED, 100, f"the update task on {r.host} is {state}"
            )
        code = status.get("LastTaskResult")
        if (
            state == "Ready"
            and code is not None
            and int(code) not in (TASK_HAS_NOT_RUN, TASK_RUNNING)
        ):
            text = (
                f"the update task on {r.host} ended without writing a result "
                f"(LastTaskResult 0x{int(code) & 0xFFFFFFFF:08X})"
            )
            return base.Job(ref, base.JobStatus.FAILED, 100, text, {"host": r.host})
        return base.Job(
            ref, base.JobStatus.RUNNING, 30, f"installing updates on {r.host} ({state})"
        )


class ScriptPatcher(_NodePatcher):
    """`script`: run the operator's PowerShell file on the node, then reboot per `reboot`."""

    name = "script"

    def begin(self, host: str) -> str:
        path = self.settings.script_path
        if not path:
            raise errors.ConfigError("patcher.script.script_path: required")
        try:
            body = pathlib.Path(path).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise errors.ConfigError(
                f"patcher.script.script_path: cannot read {path}: {exc.strerror}"
            ) from None
        boot = self.boot_time(host)
        out = self._run(host, [psrp.Cmd(body, dict(self.settings.script_parameters), script=True)])
        now = self.clock()
        if self._wants_reboot(out):
            self.restart(host)
            return Ref(host, self.name, boot, now, restart_at=now).dump()
        return Ref(host, self.name, boot, now).dump()

    def poll(self, ref: str) -> base.Job:
        r = Ref.load(ref)
        if r.restart_at is None:
            return base.Job(
                ref,
                base.JobStatus.COMPLETED,
                100,
                f"script ran on {r.host}",
                {"host": r.host, "reboot": "false"},
            )
        return self.wait_for_reboot(ref, r, r.restart_at, {"reboot": "true"})

    def _wants_reboot(self, output: list[Any]) -> bool:
        mode = self.settings.reboot
        if mode != "if-required":
            return mode == "always"
        return any(
            bool(psrp.props(o).get("RebootRequired"))
            for o in output
            if not isinstance(o, str | int | bool)
        )


def _result(status: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = status.get("Result")
    if not raw:
        return None
    try:
        parsed = json.loads(str(raw).lstrip("\ufeff"))
    except ValueError:
        return {"Status": "Failed", "Message": f"unreadable result file: {str(raw)[:200]}"}
    return parsed if isinstance(parsed, dict) else None


def settings_from_mapping(
    data: Mapping[str, object], where: str, environ: Mapping[str, str]
) -> RemotePatchSettings:
    """Validate a `patcher.<kind>` block (`workflows.config.RemotePatcherBlock`); its
    `connection` is a connection block whose `server` defaults to the node's name."""
    from workflows import config

    block = config.validate(data, config.RemotePatcherBlock, where)
    connection = conn.from_model(block.connection, f"{where}.connection", environ)
    options = block.model_dump(exclude={"connection"})
    return RemotePatchSettings(connection=connection, **options)


def validate(data: Mapping[str, object], where: str) -> None:
    """Everything `settings_from_mapping` checks except reading the connection's secret."""
    from workflows import config

    config.validate(data, config.RemotePatcherBlock, where)
