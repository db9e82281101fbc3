"""The operator's first hour: the example config, paths, typos and files as they really come.

Every test drives the real CLI in a separate process, in an environment whose home and state
folders are inside tmp_path.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from engine import db
from tests.clitools import Result, make_cli
from tests.test_cli_acceptance import MIXED
from workflows.backends import simfaults
from workflows.backends.simulated import SimulatedCluster

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-first-hour"  # must never be echoed


def environ(tmp_path: Path) -> dict[str, str]:
    """This shell's environment minus NODEPATCH_*, with HOME and XDG_STATE_HOME in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    return env | {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")}


def nodepatch(
    tmp_path: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Result:
    """`nodepatch ARGS` in a new process (cwd tmp_path unless given)."""
    proc = subprocess.run(
        [sys.executable, "-m", "workflows", *args],
        cwd=cwd or tmp_path,
        env=environ(tmp_path) | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def suggested(tmp_path: Path, line: str) -> Result:
    """Run a command line nodepatch printed, verbatim (`nodepatch` is this interpreter's)."""
    words = shlex.split(line)
    assert words[0] == "nodepatch", line
    return nodepatch(tmp_path, *words[1:])


def assert_refused(result: Result, *needles: str) -> str:
    """Exit 2 with one `nodepatch: error:` line holding every needle, no traceback."""
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("nodepatch: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def between_backticks(line: str) -> str:
    return line.split("`")[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- 1. the example configuration, folders and relative paths -------------------------------------


def test_the_example_configuration_works_as_copied(tmp_path: Path) -> None:
    """config.example.yaml copied as is: `runs` works, the log folder is created, and the
    default database lands in $XDG_STATE_HOME."""
    config = tmp_path / "etc" / "nodepatch.yaml"
    config.parent.mkdir()
    shutil.copy(REPO / "config.example.yaml", config)
    result = nodepatch(tmp_path, "--config", str(config), "runs")
    assert result.code == 0, result.err
    assert (tmp_path / "home" / ".local" / "state" / "nodepatch").is_dir()
    assert (tmp_path / "state" / "nodepatch" / "nodepatch.db").is_file()


@pytest.mark.parametrize("key", ["log.file", "database"])
def test_a_path_that_cannot_be_used_is_named_with_its_key(tmp_path: Path, key: str) -> None:
    """A file where a folder should be: exit 2 naming the key and the path, nothing created."""
    blocker = write(tmp_path / "blocker", "not a folder\n")
    if key == "log.file":
        config = write(tmp_path / "c.yaml", f"log: {{file: {blocker}/logs/np.log}}\n")
        result = nodepatch(tmp_path, "--config", str(config), "runs")
    else:
        result = nodepatch(tmp_path, "runs", env={"XDG_STATE_HOME": str(blocker)})
    assert_refused(result, key, str(blocker))
    assert not (tmp_path / "state").exists()


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path: Path) -> None:
    """The database, log and simulated cluster named relatively in a config file are found
    next to it, whatever the working directory."""
    etc = tmp_path / "etc"
    config = write(
        etc / "nodepatch.yaml",
        "database: sqlite:///data/np.db\n"
        "backend: {simulated: {file: cluster.json}}\n"
        "log: {file: logs/np.log}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    upgrade = nodepatch(tmp_path, "--config", str(config), "db", "upgrade", cwd=elsewhere)
    assert upgrade.code == 0, upgrade.err
    assert nodepatch(tmp_path, "sim", "init", "--file", str(etc / "cluster.json")).code == 0
    plan = nodepatch(
        tmp_path, "--config", "../etc/nodepatch.yaml", "plan", "--cluster", "cluster1",
        "--node", "hv01", cwd=elsewhere,
    )  # fmt: skip
    assert plan.code == 0, plan.err
    assert (etc / "data" / "np.db").is_file()
    assert (etc / "logs" / "np.log").is_file()
    assert list(elsewhere.iterdir()) == []


# -- 3. a database is created only on purpose ------------------------------------------------------


def test_a_mistyped_sqlite_url_creates_nothing_and_names_the_fix(tmp_path: Path) -> None:
    """A SQLite file that does not exist is not created by ordinary (even read-only)
    commands: exit 2 with the `db upgrade` command for that very database, which works."""
    url = f"sqlite:///{tmp_path / 'typo' / 'nodepatch.db'}"
    fix = f"nodepatch --database {url} db upgrade"
    for args in (("runs",), ("status", "x"), ("history", "x"), ("audit", "verify")):
        result = nodepatch(tmp_path, "--database", url, *args)
        assert between_backticks(assert_refused(result, "no database at")) == fix
    assert not (tmp_path / "typo").exists()
    created = suggested(tmp_path, fix)
    assert created.code == 0, created.err
    assert created.out.startswith("database upgraded from (empty) to ")
    again = suggested(tmp_path, fix)
    assert again.out.strip() == f"database already at revision {db.head_revision()}; nothing to do"
    assert nodepatch(tmp_path, "--database", url, "runs").code == 0


def test_the_no_schema_hint_names_the_database(tmp_path: Path, db_url: str) -> None:
    """A database without the schema: the suggested `db upgrade` names it with --database, and
    running it verbatim says what it changed, then that there is nothing left to do."""
    engine = db.connect(db_url)
    command.downgrade(db.alembic_config(engine), "base")
    engine.dispose()
    cli = make_cli(tmp_path, db_url)
    line = assert_refused(cli("runs"), "no nodepatch schema")
    fix = between_backticks(line)
    assert shlex.split(fix) == ["nodepatch", "--database", db_url, "db", "upgrade"]
    head = db.head_revision()
    done = cli(*shlex.split(fix)[1:])
    assert (done.code, done.out.strip()) == (0, f"database upgraded from (empty) to {head}")
    again = cli(*shlex.split(fix)[1:])
    assert again.out.strip() == f"database already at revision {head}; nothing to do"
    assert cli("runs").code == 0


# -- 4. the whole configuration is validated at start-up -------------------------------------------


VMM_BLOCK = "{server: vmm01.example, username: svc, password_env: NODEPATCH_TEST_UNSET_VAR}"


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (f"backend: {{vmm: {{server: vmm01, username: svc, password: {PASSWORD}}}}}\n",
         "backend.vmm.password"),
        (f"backend: {{kind: failover, failover: {{server: hv1, username: svc, password: "
         f"{PASSWORD}}}}}\n", "backend.failover.password"),
        ("backend: {kind: vmm, vmm: {server: vmm01, username: svc, password_env: X, prot: 1}}\n",
         "backend.vmm.prot: unknown key"),
        ("backend: {kind: vmm, vmm: {username: svc, password_env: X}}\n",
         "backend.vmm.server: required"),
        (f"patcher: {{kind: reboot, reboot: {{connection: {{password: {PASSWORD}}}}}}}\n",
         "patcher.reboot.connection.password"),
        ("patcher: {windows-update: {connection: {username: svc, password_env: X},\n"
         "  reboot_timeout_s: -1}}\n",
         "patcher.windows-update.reboot_timeout_s"),
    ],
)  # fmt: skip
def test_backend_and_patcher_blocks_are_checked_by_every_command(
    tmp_path: Path, config: str, key: str
) -> None:
    """A plain-text password or a bad key in a connection block fails even `runs`, naming the
    key (and never echoing the password)."""
    path = write(tmp_path / "c.yaml", config)
    result = nodepatch(tmp_path, "--config", str(path), "runs")
    assert_refused(result, key)
    assert PASSWORD not in result.err
    assert not (tmp_path / "state").exists()


def test_an_unset_password_variable_fails_only_commands_that_connect(tmp_path: Path) -> None:
    """The secret is read when the backend is used: `runs` works without it, `plan` names it."""
    path = write(tmp_path / "c.yaml", f"backend: {{kind: vmm, vmm: {VMM_BLOCK}}}\n")
    assert nodepatch(tmp_path, "--config", str(path), "runs").code == 0
    plan = nodepatch(tmp_path, "--config", str(path), "plan", "--cluster", "c", "--node", "n")
    assert_refused(plan, "backend.vmm.password_env", "NODEPATCH_TEST_UNSET_VAR")


# -- 2. the simulated cluster file -----------------------------------------------------------------


def _generated(path: Path, change: Callable[[dict[str, Any]], object]) -> str:
    """The text of a generated cluster file in the JSON format of an earlier nodepatch, after
    change(document)."""
    scenario = simfaults.generate(
        hosts=3, vms=12, non_ha=0, stopped_ha=0, seed=0, cluster="cluster1"
    )
    document = simfaults.build_state(scenario, speed=0.0)
    change(document)
    return json.dumps(document)


CLUSTER_FILES: dict[str, tuple[Callable[[Path], str | None], str]] = {
    "missing": (lambda p: None, "no simulated cluster at"),
    "corrupt": (lambda p: '{"clusters": [', "is not valid JSON"),
    "a list": (lambda p: "[]", "expected a JSON object, got list"),
    "a scenario": (lambda p: json.dumps(MIXED), "missing key 'counts' (a scenario?"),
    "a VM without memory": (
        lambda p: _generated(p, lambda d: d["vms"][0].pop("memory_mb")),
        "vms[0]: missing key 'memory_mb'",
    ),
    "a host without state": (
        lambda p: _generated(p, lambda d: d["clusters"][0]["hosts"][1].pop("state")),
        "clusters[0].hosts[1]: missing key 'state'",
    ),
    "a wrong type": (
        lambda p: _generated(p, lambda d: d["clusters"][0].update(hosts={})),
        "clusters[0].hosts: expected list",
    ),
}


@pytest.mark.parametrize("case", list(CLUSTER_FILES))
def test_a_bad_simulated_cluster_file_is_named_with_what_is_wrong(
    tmp_path: Path, case: str
) -> None:
    """Missing, corrupt or of the wrong shape: exit 2, one line naming the file and the fault."""
    make, problem = CLUSTER_FILES[case]
    path = tmp_path / "cluster.json"
    text = make(path)
    if text is not None:
        path.write_text(text, encoding="utf-8")
    result = nodepatch(tmp_path, "--sim", str(path), "plan", "--cluster", "c1", "--node", "hv1")
    assert_refused(result, str(path), problem)


def test_doctor_reports_a_missing_simulated_cluster_file(tmp_path: Path) -> None:
    """`doctor` on the simulated backend fails a check (exit 1) naming the missing file."""
    path = tmp_path / "nowhere" / "cluster.json"
    result = nodepatch(tmp_path, "--sim", str(path), "doctor")
    assert result.code == 1, result
    assert result.out.startswith(f"FAIL simulated: no simulated cluster at {path}")


# -- 5. scenario files and their faults ------------------------------------------------------------


def readme_block(heading: str, language: str) -> str:
    """The first fenced block of this language under the README heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


SCENARIOS = "## Simulated cluster scenarios and faults"


def test_the_readme_scenario_loads_and_its_faults_fire(tmp_path: Path) -> None:
    """The README's example scenario (with an unquoted `on:` key) creates a cluster whose
    faults point at its VMs and hosts, and the node patch it shows ends as it says."""
    write(tmp_path / "scenario.yaml", readme_block(SCENARIOS, "yaml"))
    for line in readme_block(SCENARIOS, "sh").splitlines():
        result = suggested(tmp_path, line.split("  #")[0])
        expected = int(line.rsplit("# exit ", 1)[1]) if "# exit " in line else 0
        assert result.code == expected, (line, result.err)
    shown = nodepatch(tmp_path, "sim", "show", "--file", "cluster.json", "--json").json()
    vms = {v["name"]: v for v in shown["vms"]}
    assert vms["web01"]["host"] == "hv03"  # moved by "someone else" during the patch
    assert all(v["host"] == "hv01" for n, v in vms.items() if n not in ("web01", "app01"))


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("{type: migration_fails, vm: web09}", "faults[0].vm: no VM with id or name 'web09'"),
        ("{type: host_never_returns, host: hv9}", "faults[0].host: no host 'hv9'"),
        ("{type: move_vm, vm: web01, to: hv9, on: move_vm}", "faults[0].to: no host 'hv9'"),
        ("{type: job_fails, op: reboot_host, target: hv9}", "faults[0].target: no host 'hv9'"),
        ("{type: job_fails, op: start_vm, target: hv01}", "faults[0].target: no VM with id"),
        ("{type: delete_vm, vm: web01, true: move_vm}", "key True is not a string"),
    ],
)
def test_a_fault_naming_what_is_not_in_the_scenario_is_refused(
    tmp_path: Path, fault: str, problem: str
) -> None:
    """A fault's VM, host or target must exist in the scenario: exit 2 naming it, no file."""
    scenario = write(
        tmp_path / "s.yaml",
        "clusters: [{name: c1, hosts: [{name: hv01, memory_mb: 8192}]}]\n"
        "vms: [{name: web01, host: hv01, memory_mb: 1024}]\n"
        f"faults: [{fault}]\n",
    )
    result = nodepatch(tmp_path, "sim", "init", "--file", "c.json", "--from", str(scenario))
    assert_refused(result, str(scenario), problem)
    assert not (tmp_path / "c.json").exists()


# -- 6. a mistyped cluster -------------------------------------------------------------------------


def test_an_unknown_cluster_lists_the_known_ones(tmp_path: Path) -> None:
    """A cluster typo is refused with the clusters there are, as a node typo lists the nodes."""
    SimulatedCluster.create(tmp_path / "c.json", MIXED)
    result = nodepatch(tmp_path, "--sim", "c.json", "plan", "--cluster", "c2", "--node", "hv1")
    assert_refused(result, "unknown cluster 'c2' (clusters: c1)")


# -- 7. sim init does not overwrite --------------------------------------------------------------


def test_sim_init_refuses_to_replace_a_file_without_force(tmp_path: Path) -> None:
    """An existing file is kept unless --force is given."""
    path = write(tmp_path / "cluster.json", "precious\n")
    assert_refused(nodepatch(tmp_path, "sim", "init", "--file", str(path)), str(path), "--force")
    assert path.read_text(encoding="utf-8") == "precious\n"
    assert nodepatch(tmp_path, "sim", "init", "--file", str(path), "--force").code == 0
    assert SimulatedCluster(path).snapshot()["clusters"]


# -- 8. the quick tour ---------------------------------------------------------------------------


def test_the_quick_tour_shows_both_policies_at_work(tmp_path: Path) -> None:
    """The README's quick tour, command by command: the node it patches holds the non-HA VM
    (migrated) and the stopped HA VM (evacuated), and both come back."""
    env: dict[str, str] = {}
    for raw in readme_block("## Quick tour", "sh").splitlines():
        line = raw.split("  #")[0].strip().replace("$PWD", str(tmp_path))
        if line.startswith(". "):
            continue  # activating the virtualenv: this interpreter is the virtualenv's
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
            continue
        if "RUN" in line:
            runs = nodepatch(tmp_path, "runs", "--json", env=env).json()
            line = line.replace("RUN", runs[0]["run_id"])
        words = shlex.split(line)
        result = nodepatch(tmp_path, *words[1:], env=env)
        assert result.code == (1 if words[1] == "plan" else 0), (line, result.err)  # plan: blocked
    run_id = nodepatch(tmp_path, "runs", "--json", env=env).json()[0]["run_id"]
    published = nodepatch(tmp_path, "status", run_id, "--json", env=env).json()["published"]
    actions = {v["id"]: (v["ha"], v["state"], v["action"]) for v in published["snapshot"]["vms"]}
    assert (False, "Running", "migrate") in actions.values()
    assert (True, "PowerOff", "evacuate") in actions.values()
    for row in published["rebalance"]:
        if actions[row["id"]][2] in ("migrate", "evacuate"):
            assert row["to"] != "hv01" and row["outcome"] == "moved back", row


# -- 9. the demo ---------------------------------------------------------------------------------


def test_the_demo_keeps_off_the_configured_database_and_prints_runnable_commands(
    tmp_path: Path,
) -> None:
    """The configured database is not touched; the printed `history` works verbatim."""
    production = tmp_path / "prod" / "nodepatch.db"
    config = write(tmp_path / "c.yaml", f"database: sqlite:///{production}\n")
    env = {"NODEPATCH_CONFIG": str(config), "NODEPATCH_DATABASE_URL": f"sqlite:///{production}"}
    result = nodepatch(tmp_path, "demo", "--speed", "0", env=env)
    assert result.code == 0, result.err
    assert not production.parent.exists()
    line = next(x for x in result.out.splitlines() if x.startswith("audit trail: "))
    history = subprocess.run(
        shlex.split(line.removeprefix("audit trail: ")),
        cwd=REPO,
        env=environ(tmp_path) | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert history.returncode == 0, history.stderr
    assert "Rolling -> Done" in history.stdout
    assert (tmp_path / ".nodepatch-demo" / "nodepatch.db").is_file()
