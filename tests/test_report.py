"""`nodepatch report`: the report of a node run and of a cycle, built from real runs on the
simulated cluster and a real database (SQLite file and PostgreSQL). Every figure is checked
against what the store and the audit trail hold, read independently of the report code; the
HTML is loaded in a real headless Chromium (tests/browser.py)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import errors
from engine.context import StepContext
from engine.model import utcnow
from engine.registry import Registry
from engine.runner import Runner, RunnerSettings
from engine.store import Store
from engine.workflow import Advance, Sleep, StepResult, Transition, Workflow
from tests import browser
from tests import durability as d
from workflows.backends.simulated import SimulatedCluster
from workflows.node_patch import FINAL, NODE_PATCH, NodePatch, Params, subject
from workflows.patchers.simulated import SimulatedPatcher
from workflows.plan import NonHaPolicy, Policies, StoppedHaPolicy
from workflows.report import csv as csv_report
from workflows.report import data
from workflows.report import html as html_report

SETTINGS = RunnerSettings(
    lease_ttl_s=30, poll_interval_s=0.001, retry_backoff_s=0.001, retry_backoff_max_s=0.002
)
SAVE = Policies(NonHaPolicy.SAVE, StoppedHaPolicy.EVACUATE)
BLOCK = Policies(NonHaPolicy.BLOCK, StoppedHaPolicy.LEAVE)
SHUTDOWN = Policies(NonHaPolicy.SHUTDOWN, StoppedHaPolicy.LEAVE)
NODES = ("hv1", "hv2", "hv3")


def cluster(root: Path) -> SimulatedCluster:
    """hv1: an HA VM, a running non-HA VM (saved) and a stopped HA VM (evacuated); hv2: an HA
    VM, and taking hv2 out of maintenance fails once; hv3: a running non-HA VM (blocks, then
    shut down) and an HA VM."""
    scenario = d.scenario(
        d.vm("h1", "hv1"),
        d.vm("n1", "hv1", ha=False),
        d.vm("s1", "hv1", state="PowerOff"),
        d.vm("h2", "hv2"),
        d.vm("n3", "hv3", ha=False),
        d.vm("h3", "hv3"),
    )
    scenario["faults"] = [{"type": "job_fails", "op": "exit_maintenance", "target": "hv2"}]
    return SimulatedCluster.create(root / "c1.json", scenario)


def node_runner(store: Store, sim: SimulatedCluster) -> Runner:
    workflow = NodePatch(sim, lambda *_: SimulatedPatcher(sim, patch_seconds=0)).workflow()
    return Runner(store, workflow, SETTINGS, actor="alice@ops:1")


# ---- a cycle-shaped family: a parent whose step starts real node runs ----------------------


class MiniCycle:
    """A stand-in for the cluster cycle, shaped as the report expects one: it publishes a plan,
    starts one node_patch child per node (`node:<NODE>:r<ROUND>`), and journals a health gate
    and pre/post script results for each node run that ends. A node refused in its first
    round is started again with the shutdown policy."""

    def __init__(self, plan: Mapping[str, Any]) -> None:
        self.plan = plan

    def workflow(self) -> Workflow:
        return Workflow(
            name="test_cycle",
            version=1,
            states=("Planning", "Nodes", "Done", "Failed", "Aborted"),
            initial="Planning",
            failed="Failed",
            final=frozenset({"Done", "Aborted"}),
            transitions=(
                Transition("go", "Planning", "Nodes"),
                Transition("finish", "Nodes", "Done"),
            ),
            steps={"Planning": self.planning, "Nodes": self.nodes},
        )

    def planning(self, ctx: StepContext) -> StepResult:
        return Advance("go", publish={"plan": dict(self.plan)})

    def nodes(self, ctx: StepContext) -> StepResult:
        for node in self.plan["order"]:
            for rnd, policies in ((1, BLOCK if node == "hv3" else SAVE), (2, SHUTDOWN)):
                params = Params("c1", node, policies, "simulated", 2).to_json()
                child = ctx.start_child(
                    f"node:{node}:r{rnd}",
                    workflow=NODE_PATCH,
                    version=1,
                    subject=subject("c1", node),
                    params=params,
                )
                if child.state not in FINAL:
                    return Sleep(ctx.now() + dt.timedelta(hours=1), f"waiting for {child.id}")
                if child.state != "Refused":
                    break
            self._facts(ctx, node, child.id)
        return Advance("finish")

    @staticmethod
    def _facts(ctx: StepContext, node: str, child: str) -> None:
        ok = node != "hv3"
        checks = [
            {"name": "node up", "ok": True, "detail": f"{node} is Up"},
            {"name": "health check", "ok": ok, "detail": "exit 0" if ok else "exit 2"},
        ]
        facts = {
            "gate": {"ok": ok, "checks": checks, "output": f"checked {node}"},
            "pre": {"ok": True, "output": f"pre {node}"},
            "post": {"ok": True, "output": f"post {node}"},
        }
        for kind, result in facts.items():
            key = ctx.key(f"{kind}:{node}:{child}")
            ctx._journal(key, 1, "succeeded", result=result)


PLAN = {
    "order": list(NODES),
    "waves": [{"nodes": [n], "reason": "--max-parallel 1"} for n in NODES],
    "vms": {n: [] for n in NODES},
    "problems": [],
}


def run_cycle(store: Store, sim: SimulatedCluster, plan: Mapping[str, Any] = PLAN) -> str:
    """Drive the test cycle and its node runs to the end, as a cycle and its workers would:
    a Failed node run is retried from its failed step."""
    reg = Registry()
    reg.add("test_cycle", 1, MiniCycle(plan).workflow)
    parent = Runner(
        store, reg.get("test_cycle", 1), SETTINGS, actor="bob@ops:2", initial_states=_initial
    )
    nodes = node_runner(store, sim)
    cycle_id = parent.create("c1", {"cluster": "c1", "max_parallel": 1}).id
    for _ in range(20):
        if parent.drive(cycle_id).run.state == "Done":
            return cycle_id
        for child in store.children(cycle_id):
            if child.state not in FINAL:
                nodes.drive(child.id, retry=child.state == "Failed")
    raise AssertionError("the test cycle did not finish")


def _initial(name: str, version: int) -> str:
    return {"test_cycle": "Planning", NODE_PATCH: "Preflight"}[name]


@pytest.fixture
def store(engine: sa.Engine) -> Store:
    return Store(engine)


@pytest.fixture
def node_run(store: Store, tmp_path: Path) -> str:
    """One node patch of hv1 (save and evacuate), run to Done."""
    sim = cluster(tmp_path)
    runner = node_runner(store, sim)
    params = Params("c1", "hv1", SAVE, "simulated", 2).to_json()
    run_id = runner.create(subject("c1", "hv1"), params).id
    assert runner.drive(run_id).run.state == "Done"
    return run_id


@pytest.fixture
def cycle_id(store: Store, tmp_path: Path) -> str:
    return run_cycle(store, cluster(tmp_path))


def report_of(store: Store, run_id: str) -> dict[str, Any]:
    return data.build(data.collect(store, run_id), utcnow())


# ---- a node run ------------------------------------------------------------------------------


def test_a_node_reports_figures_equal_its_runs_published_data_and_audit(
    store: Store, node_run: str
) -> None:
    """Per-VM outcomes are the run's published rebalance, the state times are the created and
    transition events, the head hash is the run's audit head, and the chain is intact."""
    report = report_of(store, node_run)
    run, events = store.get(node_run), store.events(node_run)
    published = store.published(node_run)
    assert report["kind"] == "node"
    assert report["run"]["started_by"] == events[0].actor == "alice@ops:1"
    assert report["run"]["params"] == dict(run.params)
    (node,) = report["nodes"]
    (section,) = node["runs"]
    assert {v["vm_id"]: v["outcome"] for v in section["vms"]} == {
        r["id"]: r["outcome"] for r in published["rebalance"]
    }
    entered = [(e.to_state, e.occurred_at) for e in events if e.kind in ("created", "transition")]
    assert [(s["state"], dt.datetime.fromisoformat(s["entered"])) for s in section["states"]] == (
        entered
    )
    assert [s["state"] for s in section["states"]] == [
        "Preflight",
        "Draining",
        "Patching",
        "Enabling",
        "Rebalancing",
        "Done",
    ]
    assert section["patch"] == published["patch"] and section["patch"]["kbs"]
    assert report["audit"]["intact"] is True
    assert report["audit"]["head"] == run.audit_head == events[-1].hash
    assert section["attempts"] == 1 and section["retries"] == []


def test_job_ids_and_downtime_come_from_the_journal(store: Store, node_run: str) -> None:
    """Each VM lists the external IDs of the jobs that acted on it; the saved VM's downtime is
    from its save job's end to its start job's end."""
    report = report_of(store, node_run)
    vms = {v["vm_id"]: v for v in report["vm_actions"]}
    journal = store.journal_entries(node_run)
    ended = {e.job: e.updated_at for e in journal if e.status == "succeeded"}
    saved = vms["n1"]
    assert saved["action"] == "save" and saved["outcome"] == "started"
    expected = (ended["start_vm:n1"] - ended["save_vm:n1"]).total_seconds()
    assert saved["downtime_s"] == pytest.approx(expected, abs=1e-3) and expected > 0
    refs = {e.job: e.external_ref for e in journal}
    assert saved["job_ids"] == [refs["save_vm:n1"], refs["start_vm:n1"]]
    assert vms["s1"]["action"] == "evacuate" and len(vms["s1"]["job_ids"]) == 2
    assert refs["enter_maintenance"] in vms["h1"]["job_ids"]  # the drain moved it
    assert vms["h1"]["downtime_s"] is None  # live-migrated: no downtime
    assert (vms["h1"]["from"], vms["h1"]["after_host"], vms["h1"]["after_state"]) == (
        "hv1",
        "hv1",
        "Running",
    )


def test_after_placement_matches_the_cluster_when_someone_else_moved_a_vm(
    store: Store, tmp_path: Path
) -> None:
    """A VM moved by someone else while the node rebooted: the run is done with a VM not put
    back, and every VM's after placement in the report is where the cluster has it."""
    scenario = d.scenario(d.vm("h1", "hv1"), d.vm("h2", "hv1"), d.vm("x", "hv2"))
    scenario["faults"] = [{"type": "move_vm", "vm": "h2", "to": "hv3", "on": "reboot_host"}]
    sim = SimulatedCluster.create(tmp_path / "c1.json", scenario)
    runner = node_runner(store, sim)
    params = Params("c1", "hv1", SAVE, "simulated", 2).to_json()
    run_id = runner.create(subject("c1", "hv1"), params).id
    assert runner.drive(run_id).run.state == "Done"
    report = report_of(store, run_id)
    assert report["nodes"][0]["outcome"] == "done, 1 VM(s) not put back"
    placement = d.placement(sim)
    for row in report["vm_actions"]:
        assert (row["after_host"], row["after_state"]) == placement[row["vm_id"]]
    assert placement["h2"][0] == "hv3"


def test_a_tampered_event_makes_the_audit_section_say_so(
    store: Store, engine: sa.Engine, node_run: str
) -> None:
    """An event edited in SQL behind nodepatch's back: the report's audit says tampered and
    names the event, in the JSON and on the page."""
    victim = store.events(node_run)[2].id
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE run_event DISABLE TRIGGER run_event_append_only")
        else:
            conn.exec_driver_sql("DROP TRIGGER run_event_no_update")
        conn.execute(
            sa.text("UPDATE run_event SET actor = 'mallory' WHERE id = :id"), {"id": victim}
        )
    report = report_of(store, node_run)
    assert report["audit"]["intact"] is False
    (finding,) = report["audit"]["runs"][0]["findings"]
    assert (finding["event_id"], finding["kind"]) == (victim, "edited")
    page = html_report.render(report)
    assert "AUDIT TRAIL TAMPERED" in page and "audit trail intact" not in page


# ---- a cycle ---------------------------------------------------------------------------------


def test_a_cycle_reports_every_node_run_with_its_gate_attempts_and_rounds(
    store: Store, cycle_id: str
) -> None:
    """Built from the cycle's children and journal: the plan's node order, each node's runs
    latest last (hv3 refused, then done), hv2 failed enable retried, the gate and scripts of
    each run, and the audit of every run of the family."""
    report = report_of(store, cycle_id)
    children = store.children(cycle_id)
    assert report["kind"] == "cycle" and report["run"]["started_by"] == "bob@ops:2"
    assert report["plan"] == PLAN
    assert [n["node"] for n in report["nodes"]] == list(NODES)
    by_node = {n["node"]: n for n in report["nodes"]}
    assert [r["state"] for r in by_node["hv3"]["runs"]] == ["Refused", "Done"]
    assert [r["round"] for r in by_node["hv3"]["runs"]] == [1, 2]
    hv2 = by_node["hv2"]["runs"][0]
    assert hv2["attempts"] == 2 and [r["state"] for r in hv2["retries"]] == ["Enabling"]
    assert [s["state"] for s in hv2["states"]].count("Failed") == 1
    for node in report["nodes"]:
        latest = node["runs"][-1]
        assert latest["gate"]["node"] == node["node"]
        assert latest["pre"]["output"] == f"pre {node['node']}"
        assert latest["gate"]["ok"] is (node["node"] != "hv3")
    assert by_node["hv3"]["runs"][0]["gate"] is None  # the refused round had no gate
    published = {c.id: store.published(c.id) for c in children}
    assert {(r["run_id"], r["vm_id"]): r["outcome"] for r in report["vm_actions"]} == {
        (c.id, vm["id"]): vm["outcome"]
        for c in children
        if c.state != "Refused"
        for vm in published[c.id]["rebalance"]
    } | {
        (c.id, vm["id"]): "planned"
        for c in children
        if c.state == "Refused"
        for vm in published[c.id]["snapshot"]["vms"]
    }
    started = {j["job_id"] for j in report["journal"] if ":child:node:" in j["key"]}
    assert started == {c.id for c in children}
    audit = report["audit"]
    assert audit["intact"] and audit["runs_checked"] == 1 + len(children)
    assert audit["head"] == store.get(cycle_id).audit_head
    assert {r["run_id"]: r["head"] for r in audit["runs"]} == {
        r.id: r.audit_head for r in [store.get(cycle_id), *children]
    }


def test_the_csv_has_one_row_per_vm_action(store: Store, cycle_id: str) -> None:
    report = report_of(store, cycle_id)
    rows = list(csv.DictReader(io.StringIO(csv_report.render(report))))
    assert len(rows) == len(report["vm_actions"]) == 3 + 1 + 2 * 2  # hv1, hv2, hv3 twice
    for row, action in zip(rows, report["vm_actions"], strict=True):
        assert (row["run_id"], row["node"], row["vm_id"], row["action"], row["outcome"]) == (
            action["run_id"],
            action["node"],
            action["vm_id"],
            action["action"],
            action["outcome"],
        )
        assert row["job_ids"].split() == action["job_ids"]
    shut = next(r for r in rows if r["vm_id"] == "n3" and r["action"] == "shutdown")
    assert float(shut["downtime_s"]) > 0


def test_a_csv_cell_is_never_a_formula() -> None:
    rows = [{"vm_name": "=HYPERLINK(1)", "downtime_s": -1.5, "job_ids": []}]
    text = csv_report.render({"vm_actions": rows})
    row = next(csv.DictReader(io.StringIO(text)))
    assert (row["vm_name"], row["downtime_s"]) == ("'=HYPERLINK(1)", "-1.5")


def test_the_page_is_self_contained_and_names_every_node_on_the_timeline(
    store: Store, cycle_id: str
) -> None:
    page = html_report.render(report_of(store, cycle_id))
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "https://" not in page and "@import" not in page
    for node in NODES:
        assert f'data-node="{node}"' in page


def test_names_from_the_cluster_are_escaped_on_the_page(store: Store, tmp_path: Path) -> None:
    """A VM named like markup is shown as text: the page holds no element from it."""
    evil = d.vm("e1", "hv1")
    evil["name"] = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    sim = SimulatedCluster.create(tmp_path / "c1.json", d.scenario(evil))
    runner = node_runner(store, sim)
    params = Params("c1", "hv1", SAVE, "simulated", 2).to_json()
    run_id = runner.create(subject("c1", "hv1"), params).id
    assert runner.drive(run_id).run.state == "Done"
    page = html_report.render(report_of(store, run_id))
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


# ---- the browser -----------------------------------------------------------------------------


def test_the_report_loads_in_headless_chromium(store: Store, cycle_id: str, tmp_path: Path) -> None:
    """The page loads with no console error, no exception and no network request; every node
    is on the timeline; a screenshot is taken."""
    chromium = browser.require()
    page = tmp_path / "report.html"
    page.write_text(html_report.render(report_of(store, cycle_id)), encoding="utf-8")
    shot = tmp_path / "report.png"
    seen = browser.load(chromium, page, shot)
    assert seen.errors == [] and seen.requests == []
    assert sorted(seen.timeline_nodes) == sorted(NODES)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_browser_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The harness itself: a page with a script error and a network asset is caught."""
    chromium = browser.require()
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><img src="http://127.0.0.1:9/x.png">'
        "<script>console.error('boom'); undefinedCall();</script></body></html>",
        encoding="utf-8",
    )
    seen = browser.load(chromium, page, tmp_path / "broken.png")
    assert any("boom" in e for e in seen.errors)
    assert any("undefinedCall" in e for e in seen.errors)
    assert any(r.startswith("http://127.0.0.1:9/") for r in seen.requests)


@pytest.mark.parametrize("required", [False, True])
def test_without_chromium_the_browser_test_skips_unless_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, required: bool
) -> None:
    """No chromium on PATH: a skip that says how to install it; under
    NODEPATCH_REQUIRE_BROWSER=1 (CI) a failure instead."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(browser.REQUIRE, "1" if required else "0")
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="install-chromium"):
        browser.require()


# ---- the command line ------------------------------------------------------------------------


def _cli(tmp_path: Path, db_url: str, *args: str, cwd: Path | None = None) -> Any:
    cli = d.make_cli(tmp_path / "cli", db_url)
    return subprocess.run(
        [sys.executable, "-m", "workflows", *args],
        env=cli.environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def test_report_command_writes_each_format(
    store: Store, node_run: str, db_url: str, tmp_path: Path
) -> None:
    """html by default to ./nodepatch-report-<run>.html (its path printed), json and csv to
    stdout, any of them to -o FILE; a prefix of the run ID is enough."""
    here = tmp_path / "here"
    here.mkdir()
    done = _cli(tmp_path, db_url, "report", node_run[:17], cwd=here)
    assert done.returncode == 0, done.stderr
    path = here / f"nodepatch-report-{node_run}.html"
    assert done.stdout.strip() == str(path) and path.read_text().startswith("<!DOCTYPE html>")
    doc = json.loads(_cli(tmp_path, db_url, "report", node_run, "--format", "json").stdout)
    assert doc["run"]["run_id"] == node_run and doc["audit"]["intact"] is True
    out = _cli(tmp_path, db_url, "report", node_run, "--format", "csv")
    assert len(list(csv.DictReader(io.StringIO(out.stdout)))) == 3
    target = tmp_path / "r.csv"
    written = _cli(tmp_path, db_url, "report", node_run, "--format", "csv", "-o", str(target))
    assert written.returncode == 0 and target.read_text(encoding="utf-8") == out.stdout
    missing = _cli(tmp_path, db_url, "report", "nosuchrun")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_runs_since_lists_cycles_and_node_runs_with_outcome_and_duration(
    store: Store, cycle_id: str, db_url: str, tmp_path: Path
) -> None:
    since = (utcnow() - dt.timedelta(hours=1)).isoformat()
    listed = _cli(tmp_path, db_url, "runs", "--cluster", "c1", "--since", since, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["run_id"]: r for r in json.loads(listed.stdout)}
    expected = [store.get(cycle_id), *store.children(cycle_id)]
    assert set(rows) == {r.id for r in expected}
    assert rows[cycle_id]["kind"] == "cycle" and rows[cycle_id]["outcome"] == "done"
    for run in expected:
        assert run.finished_at is not None
        seconds = (run.finished_at - run.created_at).total_seconds()
        assert rows[run.id]["duration_s"] == pytest.approx(seconds, abs=1e-3)
    table = _cli(tmp_path, db_url, "runs", "--cluster", "c1", "--since", since)
    assert "DURATION" in table.stdout and cycle_id in table.stdout
    later = (utcnow() + dt.timedelta(hours=1)).strftime("%Y-%m-%d %H:%M")
    assert (
        json.loads(
            _cli(tmp_path, db_url, "runs", "--cluster", "c1", "--since", later, "--json").stdout
        )
        == []
    )
    bad = _cli(tmp_path, db_url, "runs", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_the_report_of_a_run_that_does_not_exist_is_a_clear_error(store: Store) -> None:
    with pytest.raises(errors.RunNotFound):
        data.collect(store, "nope")
