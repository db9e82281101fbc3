"""VmmBackend over the WSMan stand-in: injection safety, the exact commands sent, error mapping."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from engine import errors
from tests.standin import build, settings_for
from tests.standin.fixtures import Rig, rig, standin_sim  # noqa: F401 - pytest fixtures
from workflows.backends import base, simulated, vmm

WEIRD = [
    'it\'s "quoted"',
    "cost $(Remove-Item C:\\ -Recurse) ${env:PATH} $x",
    "back`tick`n `$ escape",
    "semi; Stop-Computer -Force; #",
    "new\nline\r\nand\ttab",
    "näme-ünïcode-名前-🙂",
]


def weird_sim(path: Path) -> simulated.SimulatedCluster:
    hosts = [{"name": f"hv0{i}", "memory_mb": 65536} for i in (1, 2)]
    vms = [
        {"id": str(uuid.uuid4()), "name": name, "host": "hv01", "memory_mb": 1024} for name in WEIRD
    ]
    return simulated.SimulatedCluster.create(
        path, {"clusters": [{"name": "cluster1", "hosts": hosts}], "vms": vms}
    )


def test_weird_vm_names_come_back_byte_identical(tmp_path: Path) -> None:
    """VM names with quotes, $, backticks, semicolons, newlines and non-ASCII survive the trip."""
    standin, _ = build(weird_sim(tmp_path / "sim.json"))
    try:
        backend = vmm.VmmBackend(settings_for(standin, "vmm01"))
        names = sorted(v.name for v in backend.inventory("cluster1").vms)
        backend.close()
    finally:
        standin.stop()
    assert names == sorted(WEIRD)


@pytest.mark.parametrize("name", WEIRD)
def test_weird_host_names_reach_the_server_as_parameter_values(rig: Rig, name: str) -> None:  # noqa: F811
    """A host name is sent as a typed parameter value, byte-identical, never as script text."""
    backend = vmm.VmmBackend(rig.settings())
    with pytest.raises(errors.BackendError, match="unknown host"):
        backend.enter_maintenance(name)
    vm_id = rig.sim.inventory("cluster1").vms[0].id
    with pytest.raises(errors.BackendError, match="not known to VMM"):
        backend.move_vm(vm_id, name)
    backend.close()
    assert [c.params["ComputerName"] for c in rig.commands("Get-SCVMHost")] == [name]
    (script,) = rig.commands(vmm.MOVE_VM_SCRIPT)
    assert script.is_script and script.text == vmm.MOVE_VM_SCRIPT
    assert script.params["HostName"] == name
    assert str(script.params["VMId"]) == vm_id


def test_maintenance_is_a_pure_cmdlet_pipeline_with_a_job_variable(rig: Rig) -> None:  # noqa: F811
    """A new runspace first connects with Get-SCVMMServer; Disable-SCVMHost gets
    -MoveWithinCluster -RunAsynchronously -JobVariable and Get-Variable reads it back."""
    backend = vmm.VmmBackend(rig.settings())
    job_id = backend.enter_maintenance("hv01")
    backend.close()
    assert rig.calls[0].text == "Get-SCVMMServer"
    assert rig.calls[0].params == {"ComputerName": "localhost"}
    (disable,) = rig.commands("Disable-SCVMHost")
    assert not disable.is_script
    assert disable.params["MoveWithinCluster"] is True
    assert disable.params["RunAsynchronously"] is True
    (get_var,) = rig.commands("Get-Variable")
    assert get_var.params["Name"] == disable.params["JobVariable"]
    assert job_id in rig.world.jobs


def test_wrong_password_is_authentication_failed_and_not_retried(rig: Rig) -> None:  # noqa: F811
    """HTTP 401 raises AuthenticationFailed after exactly one attempt."""
    backend = vmm.VmmBackend(rig.settings(password="wrong"))
    with pytest.raises(errors.AuthenticationFailed, match="rejected the username or password"):
        backend.inventory("cluster1")
    assert rig.standin.auth_failures == 1


def test_dropped_connection_is_transient_and_the_pool_reconnects(rig: Rig) -> None:  # noqa: F811
    """A connection closed without an answer is TransientBackendError; later calls reconnect."""
    backend = vmm.VmmBackend(rig.settings())
    backend.inventory("cluster1")
    rig.standin.set_down("vmm01", True)
    with pytest.raises(errors.TransientBackendError):
        backend.inventory("cluster1")
    rig.standin.set_down("vmm01", False)
    assert backend.inventory("cluster1").hosts
    backend.close()


def test_closed_port_is_transient() -> None:
    """Connection refused is TransientBackendError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_for_port(port)
    with pytest.raises(errors.TransientBackendError, match="cannot reach"):
        vmm.VmmBackend(settings).inventory("cluster1")


def settings_for_port(port: int) -> vmm.connection.ConnectionSettings:
    return vmm.connection.ConnectionSettings(
        server="127.0.0.1",
        port=port,
        username="u",
        password="p",
        ssl=False,
        auth="basic",
        allow_insecure_basic=True,
        connection_timeout_s=2.0,
    )


def test_failed_job_carries_vmm_error_info(rig: Rig) -> None:  # noqa: F811
    """A failed VMM job is Failed, with ErrorInfo's problem in the message and details."""
    rig.sim.inject({"type": "job_fails", "op": "enter_maintenance", "target": "hv01"})
    backend = vmm.VmmBackend(rig.settings())
    job = backend.job(backend.enter_maintenance("hv01"))
    backend.close()
    assert job.status is base.JobStatus.FAILED
    assert "simulated fault" in job.message and "simulated fault" in job.details["error_info"]


def test_succeed_with_info_is_success_and_keeps_the_info(rig: Rig) -> None:  # noqa: F811
    """Draining a host with a running non-HA VM ends SucceedWithInfo, the info in the message."""
    inv = rig.sim.inventory("cluster1")
    host = next(v.host for v in inv.vms if not v.ha and v.state is base.PowerState.RUNNING)
    backend = vmm.VmmBackend(rig.settings())
    job = backend.job(backend.enter_maintenance(host))
    backend.close()
    assert job.ok and job.status is base.JobStatus.SUCCEED_WITH_INFO
    assert "was saved" in job.message


def test_job_that_never_ends_reports_running_with_progress(rig: Rig) -> None:  # noqa: F811
    """A hanging VMM job stays Running; its "50 %" progress string is read as 50."""
    rig.sim.inject({"type": "job_hangs", "op": "enter_maintenance", "target": "hv02"})
    backend = vmm.VmmBackend(rig.settings())
    job_id = backend.enter_maintenance("hv02")
    jobs = [backend.job(job_id) for _ in range(3)]
    found = backend.find_job("enter_maintenance", "hv02")
    backend.close()
    assert all(j.status is base.JobStatus.RUNNING for j in jobs)
    assert jobs[-1].progress == 50
    assert found == job_id


def test_error_records_become_backend_errors_with_their_fields(rig: Rig) -> None:  # noqa: F811
    """A terminating error from VMM keeps its message, category and command."""
    backend = vmm.VmmBackend(rig.settings())
    backend.job(backend.enter_maintenance("hv01"))
    vm = next(v for v in rig.sim.inventory("cluster1").vms if v.host != "hv01")
    with pytest.raises(errors.BackendError, match="maintenance") as caught:
        backend.move_vm(vm.id, "hv01")
    backend.close()
    assert caught.value.category == "InvalidOperation"
    assert caught.value.command == "Move-SCVirtualMachine"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("Running", base.PowerState.RUNNING),
        ("PowerOff", base.PowerState.POWER_OFF),
        ("Saved", base.PowerState.SAVED),
        ("Paused", base.PowerState.PAUSED),
        ("Stored", base.PowerState.POWER_OFF),
        ("UnderMigration", base.PowerState.RUNNING),
        ("MigrationFailed", base.PowerState.RUNNING),
    ],
)
def test_vmm_status_maps_to_power_state(status: str, expected: base.PowerState) -> None:
    """VMM Status strings map to PowerState; transitional/unknown ones count as Running."""
    vm = vmm.vm_from({"ID": "x", "Name": "n", "HostName": "hv01.corp", "Status": status})
    assert vm.state is expected and vm.host == "hv01"
