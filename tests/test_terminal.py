"""What a terminal shows, through a real pseudo-terminal: rich tables and live progress on a
TTY, the plain text of before in a pipe, and no escape code at all under NO_COLOR."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from workflows import terminal

ESC = "\x1b["


def environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    env.pop("NO_COLOR", None)
    return env | {
        "NODEPATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'n.db'}",
        "NODEPATCH_SIM": str(tmp_path / "cluster.json"),
        "TERM": "xterm-256color",
        **extra,
    }


def in_pty(args: list[str], env: dict[str, str], columns: int = 150) -> tuple[int, str]:
    """Run `nodepatch ARGS` with stdin, stdout and stderr on a new pseudo-terminal; all it
    wrote there (the terminal turns each \\n into \\r\\n)."""
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflows", *args],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
        close_fds=True,
    )
    os.close(child)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def in_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workflows", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def patched(tmp_path: Path) -> tuple[dict[str, str], str]:
    """A database holding one finished run of an instant simulated cluster; its run ID."""
    env = environ(tmp_path)
    for args in (["db", "upgrade"], ["sim", "init", "--file", env["NODEPATCH_SIM"]]):
        assert in_pipe(args, env).returncode == 0
    started = in_pipe(["start", "--cluster", "cluster1", "--node", "hv01"], env)
    assert started.returncode == 0, started.stderr
    return env, started.stdout.split()[1]


def test_tables_are_rich_on_a_terminal_and_plain_text_in_a_pipe(
    patched: tuple[dict[str, str], str],
) -> None:
    """`runs` on a terminal draws a rich table (bold headers, a rule, the state coloured); in a
    pipe it prints the plain aligned table, without a single escape code."""
    env, run_id = patched
    code, shown = in_pty(["runs"], env)
    assert code == 0
    assert f"{ESC}1mRUN" in shown and "─" in shown
    assert f"{ESC}32mDone" in shown  # Done in green
    assert run_id in shown
    piped = in_pipe(["runs"], env)
    lines = piped.stdout.splitlines()
    assert lines[0].split() == ["RUN", "CLUSTER/NODE", "STATE", "CREATED", "(UTC)", "BY", "ERROR"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split()[:3] == [run_id, "cluster1/hv01", "Done"]
    assert ESC not in piped.stdout + piped.stderr


def test_no_color_removes_every_escape_code(patched: tuple[dict[str, str], str]) -> None:
    """Under NO_COLOR a terminal still gets the drawn tables, but no escape code at all."""
    env, run_id = patched
    for args in (["runs"], ["status", run_id], ["history", run_id]):
        code, shown = in_pty(args, env | {"NO_COLOR": "1"})
        assert code == 0, shown
        assert "─" in shown and run_id in shown
        assert "\x1b" not in shown, args


def test_status_json_is_untouched_on_a_terminal(patched: tuple[dict[str, str], str]) -> None:
    """`--json` prints the same JSON document on a terminal as in a pipe."""
    env, run_id = patched
    code, shown = in_pty(["status", run_id, "--json"], env)
    assert code == 0
    document = json.loads(shown)
    piped = json.loads(in_pipe(["status", run_id, "--json"], env).stdout)
    assert document["run_id"] == piped["run_id"] == run_id
    assert document["journal"] == piped["journal"]
    assert ESC not in shown


def test_live_progress_on_a_terminal_plain_result_in_a_pipe(tmp_path: Path) -> None:
    """Driving a run on a terminal shows a live panel (the current state and for how long, the
    jobs in flight with their progress and how long each has been waited for) and keeps the
    state changes in the scrollback; the result is printed after the panel is gone. In a pipe
    there is no panel and no escape code: the output of before."""
    env = environ(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("patcher: {simulated: {patch_seconds: 4}}\n", encoding="utf-8")
    env["NODEPATCH_CONFIG"] = str(config)
    assert in_pipe(["db", "upgrade"], env).returncode == 0
    sim = ["sim", "init", "--hosts", "2", "--vms", "2", "--speed", "4", "--file"]
    assert in_pipe([*sim, env["NODEPATCH_SIM"]], env).returncode == 0
    code, shown = in_pty(["start", "--cluster", "cluster1", "--node", "hv01"], env)
    assert code == 0, shown
    assert "  Preflight -> Draining\r\n" in shown  # in the scrollback
    assert "  Enabling -> Rebalancing\r\n" in shown
    assert "Patching for " in shown  # the panel: the current state and its time
    assert "in flight" in shown and "waiting " in shown  # a job in flight, its time
    assert "patching hv01" in shown
    assert f"{ESC}?25l" in shown  # the live panel hid the cursor (and shows it again)
    assert "state Done" in shown.split("Rebalancing -> Done")[-1]  # the result, after
    env["NODEPATCH_SIM"] = str(tmp_path / "again.json")
    assert in_pipe([*sim, env["NODEPATCH_SIM"]], env).returncode == 0
    piped = in_pipe(["start", "--cluster", "cluster1", "--node", "hv01"], env)
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert ESC not in piped.stdout
    assert piped.stdout.splitlines()[0].startswith("run ")


def test_the_panel_follows_the_messages() -> None:
    """The live panel's model: a transition sets the state and clears the jobs; `LABEL: N%`
    puts a job in flight (keeping when it was first seen) until it reaches 100%."""
    watch = terminal._Watch()
    assert watch.note("Preflight -> Draining")
    assert watch.state == "Draining"
    assert not watch.note("move web01 to hv02: 10% migrating")
    first = watch.jobs["move web01 to hv02"].since
    assert not watch.note("move web01 to hv02: 50% migrating")
    assert watch.jobs["move web01 to hv02"].percent == 50
    assert watch.jobs["move web01 to hv02"].since == first
    assert watch.note("move web01 to hv02: 100% done")
    assert watch.jobs == {}
    assert not watch.note("patching hv01: 20%")
    assert watch.note("Patching -> Failed: the node never came back")
    assert (watch.state, watch.jobs) == ("Failed", {})
    assert watch.note("drain failed: x; moving the remaining VMs one by one")


def test_a_line_said_again_at_a_re_entry_is_shown_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A waiting step that gives its lease back says what it waits for at each re-entry: the
    terminal shows the line once, until another line comes between."""
    progress = terminal.Progress(True, live=False)
    for message in ("waiting for hv01 to respond (Down)",) * 3 + ("Enabling -> Rebalancing",):
        progress(message)
    progress("waiting for hv01 to respond (Down)")
    assert capsys.readouterr().err.splitlines() == [
        "  waiting for hv01 to respond (Down)",
        "  Enabling -> Rebalancing",
        "  waiting for hv01 to respond (Down)",
    ]
