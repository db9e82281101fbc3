"""The scheduler recipes under examples/ work: the CI shell step chains a real node patch by
exit codes against the simulator (done, VMs not put back, refused, busy, patch tool failed),
the systemd units pass `systemd-analyze verify`, and the cron and Task Scheduler definitions
are well-formed and run what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.clitools import FAST_CONFIG, Cli, make_cli
from tests.test_cli_acceptance import MIXED
from workflows.backends.simulated import SimulatedCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEP = EXAMPLES / "ci" / "patch-node.sh"
TOOL = """#!/bin/sh
echo "$1" >> "$(dirname "$0")/patched-nodes"
exit "${TOOL_EXIT:-0}"
"""


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    found = make_cli(
        tmp_path, f"sqlite:///{tmp_path / 'n.db'}", FAST_CONFIG + "patcher: {kind: external}\n"
    )
    assert found("db", "upgrade").code == 0
    return found


def step(
    cli: Cli, tmp_path: Path, node: str, tool_exit: int = 0
) -> subprocess.CompletedProcess[str]:
    tool = tmp_path / "patch-tool.sh"
    tool.write_text(TOOL, encoding="utf-8")
    tool.chmod(0o755)
    env = cli.environ({"NODEPATCH": f"{sys.executable} -m workflows", "TOOL_EXIT": str(tool_exit)})
    return subprocess.run(
        ["/bin/sh", str(STEP), "c1", node, str(tool)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def patched(tmp_path: Path) -> list[str]:
    marker = tmp_path / "patched-nodes"
    return marker.read_text(encoding="utf-8").split() if marker.exists() else []


def last_run(cli: Cli) -> dict[str, object]:
    doc: dict[str, object] = cli("runs", "--json").json()[0]
    return doc


def test_ci_step_patches_a_node_end_to_end(cli: Cli, tmp_path: Path) -> None:
    """start --until Patching (3), the patch tool, signal patched, resume (0): Done, the tool
    ran once for the node, every VM back where it was."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    before = {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}
    result = step(cli, tmp_path, "hv1")
    assert result.returncode == 0, result.stderr
    assert "hv1 patched, every VM back" in result.stdout
    assert patched(tmp_path) == ["hv1"]
    assert last_run(cli)["state"] == "Done"
    assert {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]} == before
    events = cli("history", str(last_run(cli)["run_id"]), "--json").json()["events"]
    assert any(e["kind"] == "signal" and e["details"].get("signal") == "patched" for e in events)


def test_ci_step_exits_5_when_a_vm_was_not_put_back(cli: Cli, tmp_path: Path) -> None:
    """A VM deleted by someone else meanwhile: the step exits 5 and lists it."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    sim.inject({"type": "delete_vm", "vm": "a1", "on": "exit_maintenance"})
    result = step(cli, tmp_path, "hv1")
    assert result.returncode == 5, result.stderr
    assert "not put back" in result.stderr and "a1" in result.stderr


def test_ci_step_stops_at_a_refusal_without_patching(cli: Cli, tmp_path: Path) -> None:
    """A running non-HA VM under the default `block` policy: exit 1, the tool never runs."""
    SimulatedCluster.create(cli.sim, MIXED)
    result = step(cli, tmp_path, "hv2")
    assert result.returncode == 1
    assert "refused or failed before patching" in result.stderr
    assert patched(tmp_path) == []
    assert last_run(cli)["state"] == "Refused"


def test_ci_step_exits_4_when_the_node_is_busy(cli: Cli, tmp_path: Path) -> None:
    """The node already has an unfinished run: exit 4 (try later), nothing done."""
    SimulatedCluster.create(cli.sim, MIXED)
    assert cli("start", "--cluster", "c1", "--node", "hv1", "--until", "Draining").code == 3
    result = step(cli, tmp_path, "hv1")
    assert result.returncode == 4
    assert patched(tmp_path) == []


def test_ci_step_aborts_when_the_patch_tool_fails(cli: Cli, tmp_path: Path) -> None:
    """The patch tool fails: the run is aborted (node out of maintenance, VMs back), exit 1."""
    sim = SimulatedCluster.create(cli.sim, MIXED)
    before = {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]}
    result = step(cli, tmp_path, "hv1", tool_exit=7)
    assert result.returncode == 1
    assert "aborting run" in result.stderr
    assert last_run(cli)["state"] == "Aborted"
    assert {v["id"]: (v["host"], v["state"]) for v in sim.snapshot()["vms"]} == before
    hosts = {h["name"]: h for h in sim.snapshot()["clusters"][0]["hosts"]}
    assert not hosts["hv1"].get("maintenance")


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The worker service and the monthly cycle timer (as an instance) verify, with ExecStart
    pointed at this nodepatch (verify checks that the program exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the unit files are not verified")
    nodepatch = Path(sys.executable).with_name("nodepatch")
    assert nodepatch.exists()
    names = {
        "nodepatch-worker.service": "nodepatch-worker.service",
        "nodepatch-cycle@.service": "nodepatch-cycle@CLUSTER01.service",
        "nodepatch-cycle@.timer": "nodepatch-cycle@CLUSTER01.timer",
    }
    for source, target in names.items():
        text = (EXAMPLES / "systemd" / source).read_text(encoding="utf-8")
        assert "/opt/nodepatch/.venv/bin/nodepatch" in text or source.endswith(".timer")
        text = text.replace("/opt/nodepatch/.venv/bin/nodepatch", str(nodepatch))
        (tmp_path / target).write_text(text, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    assert "nodepatch-cycle" not in result.stderr, result.stderr
    timer = (EXAMPLES / "systemd" / "nodepatch-cycle@.timer").read_text(encoding="utf-8")
    calendar = subprocess.run(
        [analyze, "calendar", "Wed *-*-09..15 02:00:00"], capture_output=True, text=True,
        check=False, timeout=30,
    )  # fmt: skip
    assert "OnCalendar=Wed *-*-09..15 02:00:00" in timer and calendar.returncode == 0


def test_cron_lines_are_well_formed() -> None:
    """Each line is a comment, a variable, or five time fields, a user and a shell command
    that parses; the cycle line treats exit 3 (left to the workers) as success."""
    lines = (EXAMPLES / "cron" / "nodepatch.cron").read_text(encoding="utf-8").splitlines()
    jobs = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    jobs = [line for line in jobs if "=" not in line.split()[0]]
    assert jobs
    for job in jobs:
        fields = job.split(None, 6)
        assert len(fields) == 7 and fields[5] == "nodepatch"
        command = fields[6].replace("\\%", "%")
        assert "%" not in command.replace("+%u", "")  # a bare % ends a cron command
        parsed = subprocess.run(["/bin/sh", "-n", "-c", command], capture_output=True, check=False)
        assert parsed.returncode == 0, parsed.stderr
    assert "cycle start --cluster CLUSTER01 --detach" in jobs[0] and "-eq 3" in jobs[0]


def test_task_scheduler_definition_runs_the_cycle_monthly() -> None:
    """The Task Scheduler XML is well-formed, triggers on the second Wednesday of every month
    and runs `nodepatch cycle start --detach` (no password in it)."""
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    root = ET.parse(EXAMPLES / "windows" / "nodepatch-cycle.xml").getroot()  # noqa: S314 - our file
    monthly = root.find("t:Triggers/t:CalendarTrigger/t:ScheduleByMonthDayOfWeek", ns)
    assert monthly is not None
    assert [w.text for w in monthly.findall("t:Weeks/t:Week", ns)] == ["2"]
    assert monthly.find("t:DaysOfWeek/t:Wednesday", ns) is not None
    assert len(monthly.findall("t:Months/*", ns)) == 12
    command = root.findtext("t:Actions/t:Exec/t:Command", namespaces=ns)
    arguments = root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns)
    assert command is not None and command.endswith("nodepatch.exe")
    assert arguments == "cycle start --cluster CLUSTER01 --detach --json"
    assert "Password>" not in ET.tostring(root, encoding="unicode").replace("LogonType", "")


def test_the_monthly_cycle_unit_starts_a_cycle_that_a_worker_finishes(tmp_path: Path) -> None:
    """The timer's service runs its ExecStart as written (the program and %i substituted): the
    cycle is recorded and left to the workers (exit 3, one of its SuccessExitStatus), and a
    worker then patches the whole simulated cluster."""
    cli = make_cli(
        tmp_path, f"sqlite:///{tmp_path / 'n.db'}", FAST_CONFIG + "cycle: {poll_s: 0.01}\n"
    )
    assert cli("db", "upgrade").code == 0
    SimulatedCluster.create(cli.sim, MIXED)
    unit = (EXAMPLES / "systemd" / "nodepatch-cycle@.service").read_text(encoding="utf-8")
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    success = next(x for x in unit.splitlines() if x.startswith("SuccessExitStatus="))
    argv = line.removeprefix("ExecStart=").replace("%i", "c1").split()
    assert argv[0].endswith("/nodepatch")
    started = cli(*argv[1:], "--non-ha", "migrate")
    assert str(started.code) in success.split("=", 1)[1].split(), started.err
    run_id = started.json()["run_id"]
    assert cli("worker", "--until-idle", "--poll", "0.05").code == 0
    assert cli("cycle", "status", run_id, "--json").json()["state"] == "Done"
