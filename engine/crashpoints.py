"""Named crash points for durability tests: inert unless NODEPATCH_CRASH_AT names the point.

`hit(name)` exits the process at once (os._exit, no cleanup, no commit) when the environment
variable NODEPATCH_CRASH_AT equals name (its first passing in this process) or `name#N` (its
N-th passing), or `prefix*` (the first point whose name starts with prefix), simulating a
power cut or SIGKILL at that instant. Every point passed is recorded
when NODEPATCH_CRASH_TRACE names a file, so tests can list the points a run goes through.
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 137

_passed: dict[str, int] = {}


def hit(name: str) -> None:
    count = _passed[name] = _passed.get(name, 0) + 1
    trace = os.environ.get("NODEPATCH_CRASH_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:  # noqa: PTH123 - hot and tiny
            fh.write(name + "\n")
    at = os.environ.get("NODEPATCH_CRASH_AT")
    if at and (at in (name, f"{name}#{count}") or (at[-1] == "*" and name.startswith(at[:-1]))):
        os._exit(CRASH_EXIT_CODE)
