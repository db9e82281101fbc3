"""pytest plugin for the coverage pass of `make mutate` (loaded with `-p`, never by `make test`).

It records which test runs which line: in this process through one coverage context per test,
and in the `nodepatch` processes a test starts through one data file per test (they inherit
`COVERAGE_PROCESS_START`, which makes coverage's .pth file measure them, and `COVERAGE_FILE`).
It also records how long each test takes, so each mutant runs its tests fastest first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path

import coverage
import pytest

DIRECTORY = "MUTATION_COVERAGE_DIR"
INDEX = "tests.json"
RCFILE = "coveragerc"

_children: dict[str, str] = {}
_durations: dict[str, float] = {}


def _directory() -> Path:
    return Path(os.environ[DIRECTORY])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    cov = coverage.Coverage.current()
    child = f"child-{len(_children)}"
    _children[child] = item.nodeid
    os.environ["COVERAGE_PROCESS_START"] = str(_directory() / RCFILE)
    os.environ["COVERAGE_FILE"] = str(_directory() / child)
    if cov is not None:
        cov.switch_context(item.nodeid)
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _durations[item.nodeid] = time.perf_counter() - start
        if cov is not None:
            cov.switch_context("")
        del os.environ["COVERAGE_FILE"], os.environ["COVERAGE_PROCESS_START"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    index = {"children": _children, "durations": _durations}
    (_directory() / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
