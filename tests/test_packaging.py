"""Packaging: the wheel carries everything nodepatch needs at run time (the migrations), so
`pip install` into a fresh virtualenv outside the repository and `nodepatch demo` in an empty
folder work; the Dockerfile builds a worker image configured from the environment."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ("No matching distribution", "Could not find a version", "Failed to establish")


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_the_demo_runs_in_an_empty_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Build the wheel, install it (with its dependencies) into a new virtualenv outside the
    repository, and run `nodepatch demo` in an empty folder: it migrates a fresh database from
    the packaged migrations, patches a node and exits 0; its printed follow-up works."""
    wheels = tmp_path_factory.mktemp("wheels")
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                  str(ROOT)], cwd=wheels)  # fmt: skip
    if built.returncode and any(s in built.stderr for s in OFFLINE):
        pytest.skip(f"the package index is unreachable: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("nodepatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert [n for n in names if n.startswith("migrations/versions/")] == [
        f"migrations/versions/{v}" for v in versions
    ]
    home = tmp_path_factory.mktemp("fresh")
    venv.create(home / "venv", with_pip=True)
    pip = home / "venv" / "bin" / "pip"
    installed = _run([str(pip), "install", "-q", str(wheel)], cwd=home)
    if installed.returncode and any(s in installed.stderr for s in OFFLINE):
        pytest.skip(f"the package index is unreachable: {installed.stderr.strip()[-200:]}")
    assert installed.returncode == 0, installed.stderr
    empty = home / "empty"
    empty.mkdir()
    nodepatch = home / "venv" / "bin" / "nodepatch"
    demo = subprocess.run(
        [str(nodepatch), "demo", "--speed", "0"],
        cwd=empty, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_STATE_HOME": str(home / "state")},
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "every VM is back on its host in its power state" in demo.stdout
    follow = re.search(r"^every run:\s+(.*)$", demo.stdout, re.MULTILINE)
    assert follow is not None
    listed = _run(follow.group(1).split(), cwd=home)
    assert listed.returncode == 0 and "Done" in listed.stdout, listed.stderr


def test_the_dockerfile_runs_the_worker_configured_from_the_environment() -> None:
    """A slim Python base, the project installed with pip, a non-root user, the worker as the
    default command with /metrics exposed, and no secret or database URL baked in. (Building
    the image needs docker and the network, which tests do not assume.)"""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.split(None, 1)
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    kinds = [k.upper() for k, *_ in instructions]
    assert re.fullmatch(r"python:3\.1[1-9]-slim", instructions[0][1].strip())
    assert kinds[0] == "FROM" and kinds.count("FROM") == 1
    args = dict((k.upper(), v) for k, v in instructions if k.upper() in ("CMD", "ENTRYPOINT"))
    assert args["ENTRYPOINT"].strip() == '["nodepatch"]'
    assert args["CMD"].startswith('["worker"') and '"--metrics-port", "9464"' in args["CMD"]
    assert any(k == "RUN" and "pip install ." in v for k, v in instructions)
    user = [v.strip() for k, v in instructions if k.upper() == "USER"]
    assert user and user[-1] not in ("root", "0")
    env = " ".join(v for k, v in instructions if k.upper() == "ENV")
    assert not re.search(r"PASSWORD|SECRET|DATABASE_URL|TOKEN", env, re.IGNORECASE)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv"} <= set(ignored)
    for copied in ("engine", "workflows", "migrations"):
        assert f"COPY {copied} {copied}" in text
