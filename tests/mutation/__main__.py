"""`make mutate`: mutation testing of the durable core with cosmic-ray, on SQLite, one mutant at
a time. Not part of `make test` or CI.

    python -m tests.mutation            a full run (about 40 minutes on one core)
    python -m tests.mutation resume     finish an interrupted run
    python -m tests.mutation rerun [ID...]   after adding tests: the given mutants, or every
                                        survivor, against the current tests
    python -m tests.mutation report     the summary again

Everything goes under .mutation/ (ignored by git):

1. The working tree is copied to .mutation/src; cosmic-ray edits files on disk, so the mutants
   are applied there and the working tree stays usable during a run.
2. Coverage pass: the test POOL runs once under coverage, with a context per test in the test
   process and a data file per test for the `nodepatch` processes a test starts (see
   `coverage_pass`). For every line of the TARGETS this gives the tests that execute it.
3. cosmic-ray lists the mutants of the TARGETS (the OPERATORS below), into
   .mutation/session.sqlite (`cr-report` and `cr-html` read it).
4. Each mutant is applied in the copy, and only the tests that execute its lines run, fastest
   first, stopping at the first failure. A mutant on a line no test executes is recorded as
   survived, `not covered`, without running anything.
5. .mutation/report.txt: killed / survived / not covered / timeout / error per module, and the
   diff of every mutant that was not killed.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import coverage
from cosmic_ray import plugins
from cosmic_ray.commands import init
from cosmic_ray.mutating import mutate_and_test, mutate_code
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkItem, WorkResult

from tests.mutation import coverage_pass as plugin
from tests.mutation.equivalent import EQUIVALENT, squash

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutation"
SRC = WORK / "src"
SESSION = WORK / "session.sqlite"
REPORT = WORK / "report.txt"
HASHES = WORK / "targets.json"

# The fast tests that exercise each target, SQLite only. The engine's modules are held by
# in-process tests; the CLI-driven fault tests reach no line of theirs that these miss, at ten
# times the cost. Left out everywhere: test_properties (slow: its 60 random examples would add
# seconds to every surviving mutant), test_cli_acceptance and test_audit (the lines they reach,
# through the CLI, are all reached here too), test_simulated (only the simulator).
ENGINE_TESTS = (
    "tests/test_engine.py",
    "tests/test_guards.py",
    "tests/test_crash_matrix.py",
)
WORKFLOW_TESTS = (
    "tests/test_plan.py",
    "tests/test_crash_matrix.py",
    "tests/test_cluster_faults.py",
)
TARGETS = {
    "engine/store.py": ENGINE_TESTS,
    "engine/storebase.py": ENGINE_TESTS,
    "engine/dbretry.py": ENGINE_TESTS,
    "engine/reads.py": ENGINE_TESTS,
    "engine/creation.py": ENGINE_TESTS,
    "engine/leases.py": ENGINE_TESTS,
    "engine/signals.py": ENGINE_TESTS,
    "engine/advance.py": ENGINE_TESTS,
    "engine/journal.py": ENGINE_TESTS,
    "engine/context.py": ENGINE_TESTS,
    "engine/compiled.py": (*ENGINE_TESTS, "tests/test_compiled.py"),
    "engine/heartbeat.py": ("tests/test_heartbeat.py",),
    "workflows/plan.py": WORKFLOW_TESTS,
    "workflows/node_patch.py": WORKFLOW_TESTS,
}
POOL = tuple(sorted({test for tests in TARGETS.values() for test in tests}))
PYTEST = (
    *("-m", "not postgres", "-p", "no:cacheprovider", "-q"),
    *("--deselect", "tests/test_crash_matrix.py::test_crash_at_every_traced_point"),
)

# Negation and boundary of each comparison, and no permutations beyond: cosmic-ray's parser reads
# the `*` of keyword-only parameters, `**` unpacking and `X | None` annotations as binary
# operators, so Mul, Pow and BitOr mutants are syntax noise here.
OPERATORS = re.compile(
    r"core/(AddNot|NumberReplacer|ExceptionReplacer|RemoveDecorator|ZeroIterationForLoop"
    r"|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd"
    r"|ReplaceContinueWithBreak|ReplaceBreakWithContinue|ReplaceUnaryOperator_Delete_(Not|USub)"
    r"|ReplaceBinaryOperator_(Add_Sub|Sub_Add|BitAnd_BitOr)"
    r"|ReplaceComparisonOperator_(Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is"
    r"|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Lt_GtE|LtE_Gt|Gt_LtE|GtE_Lt))$"
)

NOT_COVERED = "not covered: no test of the pool executes this line"
EQUIVALENT_PREFIX = "equivalent: "

TestMap = dict[str, dict[int, set[str]]]


# ---- the copy and the coverage pass ----------------------------------------------------------


def copy_tree() -> None:
    """The working tree as it is now (tracked and untracked files git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    shutil.rmtree(SRC, ignore_errors=True)
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (SRC / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, SRC / name)


def target_hashes() -> dict[str, str]:
    return {t: hashlib.sha256((SRC / t).read_bytes()).hexdigest() for t in TARGETS}


def map_coverage() -> tuple[TestMap, dict[str, float]]:
    """Run the pool once under coverage: the tests executing each line, and each test's time."""
    directory = WORK / "coverage"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rcfile = directory / plugin.RCFILE
    include = "\n    ".join(str(SRC / t) for t in TARGETS)
    rcfile.write_text(
        f"[run]\nparallel = true\ndata_file = {directory / 'main'}\ninclude =\n    {include}\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "coverage", "run", f"--rcfile={rcfile}", "-m", "pytest"]
    command += ["-p", "tests.mutation.coverage_pass", "--basetemp", str(WORK / "tmp")]
    print("coverage pass:", shlex.join([*POOL, *PYTEST]), flush=True)
    environ = os.environ | {plugin.DIRECTORY: str(directory)}
    if subprocess.run([*command, *POOL, *PYTEST], cwd=SRC, env=environ, check=False).returncode:
        sys.exit("the test pool fails without any mutant: fix that first")
    index = json.loads((directory / plugin.INDEX).read_text(encoding="utf-8"))
    tests: TestMap = {t: {} for t in TARGETS}
    for path in directory.glob("*.*"):
        if not path.name.startswith(("main.", "child-")):
            continue
        data = coverage.CoverageData(basename=str(path))
        data.read()
        child = index["children"].get(path.name.split(".", 1)[0])
        for measured in data.measured_files():
            module = Path(measured).relative_to(SRC).as_posix()
            if child is not None:
                for line in data.lines(measured) or ():
                    tests[module].setdefault(line, set()).add(child)
                continue
            for line, contexts in data.contexts_by_lineno(measured).items():
                tests[module].setdefault(line, set()).update(c for c in contexts if c)
    return tests, index["durations"]


def line_keys(source: str) -> dict[int, set[int]]:
    """For each line inside a function, the lines whose tests exercise a mutant on it: those of
    its statement (of the header, for a compound statement); for a function's decorators and
    signature, those of its whole body. Module and class level lines are absent: they run on
    import, so every test of the module exercises them."""
    keys: dict[int, set[int]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = set(range(node.body[0].lineno, (node.end_lineno or node.lineno) + 1))
        for line in range(min([node.lineno, *(d.lineno for d in node.decorator_list)]), min(body)):
            keys[line] = body
        for stmt in ast.walk(node):
            if stmt is not node and isinstance(stmt, ast.stmt | ast.ExceptHandler):
                span = set(range(stmt.lineno, _header_end(stmt) + 1))
                for line in span:
                    keys.setdefault(line, span)
    return keys


def _header_end(stmt: ast.stmt | ast.ExceptHandler) -> int:
    """The last line of a simple statement, or of the header of a compound one."""
    if isinstance(stmt, ast.FunctionDef):  # a nested function: mapped as a function
        return stmt.lineno
    body = getattr(stmt, "body", None)
    if not body:
        return stmt.end_lineno or stmt.lineno
    return max(stmt.lineno, body[0].lineno - 1)


# ---- the session -----------------------------------------------------------------------------


def create_session() -> None:
    SESSION.unlink(missing_ok=True)
    with use_db(str(SESSION)) as db:
        init([Path(t) for t in TARGETS], db, {})
        items = [i for i in db.work_items if OPERATORS.match(i.mutations[0].operator_name)]
        db.clear()
        db.add_work_items(sorted(items, key=_order))
    HASHES.write_text(json.dumps(target_hashes(), indent=1), encoding="utf-8")


def _order(item: WorkItem) -> tuple[int, tuple[int, int], str, int]:
    m = item.mutations[0]
    return list(TARGETS).index(_module(item)), m.start_pos, m.operator_name, m.occurrence


class Selector:
    """The tests of a mutant's target pool that execute its lines, fastest first."""

    def __init__(self, tests: TestMap, durations: dict[str, float]) -> None:
        self.tests = {
            module: {
                line: {t for t in chosen if t.split("::", 1)[0] in TARGETS[module]}
                for line, chosen in by_line.items()
            }
            for module, by_line in tests.items()
        }
        self.durations = durations
        self.keys = {t: line_keys((SRC / t).read_text(encoding="utf-8")) for t in TARGETS}

    def __call__(self, item: WorkItem) -> list[str]:
        m = item.mutations[0]
        module = _module(item)
        by_line = self.tests[module]
        chosen: set[str] = set()
        for line in range(m.start_pos[0], m.end_pos[0] + 1):
            keys = self.keys[module].get(line)
            if keys is None:  # module or class level: runs on import, for every test
                chosen.update(*by_line.values())
            else:
                chosen.update(*(by_line.get(k, ()) for k in keys))
        return sorted(chosen, key=lambda t: (self.durations.get(t, 0.0), t))


def run_mutants(db: WorkDB, items: Sequence[WorkItem], select: Selector) -> None:
    os.chdir(SRC)
    for number, item in enumerate(items, 1):
        started = time.monotonic()
        chosen = select(item)
        why = equivalent(item)
        if why:
            result = WorkResult(
                worker_outcome=WorkerOutcome.NORMAL,
                test_outcome=TestOutcome.SURVIVED,
                output=EQUIVALENT_PREFIX + why,
                diff=_diff(item),
            )
        elif chosen:
            command = [sys.executable, "-m", "pytest", "-x", "--basetemp", str(WORK / "tmp")]
            limit = 30 + 3 * sum(select.durations.get(t, 1.0) for t in chosen)
            command += [*PYTEST, *chosen]
            result = mutate_and_test(item.mutations, shlex.join(command), limit)
        else:
            result = WorkResult(
                worker_outcome=WorkerOutcome.NORMAL,
                test_outcome=TestOutcome.SURVIVED,
                output=NOT_COVERED,
                diff=_diff(item),
            )
        db.set_result(item.job_id, result)
        m = item.mutations[0]
        print(
            f"{number}/{len(items)} {status(result):11} {m.module_path}:{m.start_pos[0]} "
            f"{_operator(item)} {item.job_id[:8]} ({time.monotonic() - started:.1f}s, "
            f"{len(chosen)} tests) {killed_by(result)}",
            flush=True,
        )


def _mutated(item: WorkItem) -> tuple[list[str], list[str]]:
    m = item.mutations[0]
    source = (SRC / m.module_path).read_text(encoding="utf-8")
    operator = plugins.get_operator(m.operator_name)(**m.operator_args)
    try:
        mutated = mutate_code(source, operator, m.occurrence) or source
    except AttributeError:  # cosmic-ray's ExceptionReplacer cannot rewrite `except a.b.Error`
        mutated = source
    return source.splitlines(), mutated.splitlines()


def _diff(item: WorkItem) -> str:
    source, mutated = _mutated(item)
    return "\n".join(difflib.unified_diff(source, mutated, lineterm="", n=1))


def equivalent(item: WorkItem) -> str | None:
    """The reason the mutant is equivalent, if EQUIVALENT names it."""
    m = item.mutations[0]
    lines = (SRC / m.module_path).read_text(encoding="utf-8").splitlines()
    here = squash("".join(lines[m.start_pos[0] - 1 : m.end_pos[0]]))
    if not any(squash(entry.before) in here for entry in EQUIVALENT):
        return None  # cheap: mutating the module takes a parse of it
    source, mutated = _mutated(item)
    matcher = difflib.SequenceMatcher(a=source, b=mutated, autojunk=False)
    changed = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    if not changed:
        return None
    _tag, i1, i2, j1, j2 = changed[0]
    before, after = squash("".join(source[i1:i2])), squash("".join(mutated[j1:j2]))
    for entry in EQUIVALENT:
        if entry.matches(_module(item), m.definition_name, before, after):
            return entry.why
    return None


# ---- results ---------------------------------------------------------------------------------


def status(result: WorkResult) -> str:
    if result.worker_outcome != WorkerOutcome.NORMAL:
        return "error"
    if result.test_outcome == TestOutcome.KILLED:
        return "timeout" if result.output == "timeout" else "killed"
    if result.test_outcome == TestOutcome.SURVIVED:
        if (result.output or "").startswith(EQUIVALENT_PREFIX):
            return "equivalent"
        return "not covered" if result.output == NOT_COVERED else "survived"
    return "error"


def killed_by(result: WorkResult) -> str:
    if status(result) != "killed":
        return ""
    for line in (result.output or "").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ", 1)[0]
    return "(collection or import error)"


def _module(item: WorkItem) -> str:
    return item.mutations[0].module_path.as_posix()


def _operator(item: WorkItem) -> str:
    return item.mutations[0].operator_name.removeprefix("core/")


def report(db: WorkDB, elapsed: float | None = None) -> None:
    done = sorted(db.completed_work_items, key=lambda pair: _order(pair[0]))
    columns = ("killed", "survived", "not covered", "equivalent", "timeout", "error")
    lines = [f"{'module':26}" + "".join(f"{c:>13}" for c in columns)]
    for target in TARGETS:
        counts = Counter(status(r) for i, r in done if _module(i) == target)
        lines.append(f"{target:26}" + "".join(f"{counts[c]:>13}" for c in columns))
    pending = db.num_work_items - len(done)
    if pending:
        lines.append(f"{pending} mutants not run yet (python -m tests.mutation resume)")
    if elapsed is not None:
        lines.append(f"run time {elapsed / 60:.1f} min")
    summary = "\n".join(lines)
    details, equivalents = [], ["\n== equivalent (tests/mutation/equivalent.py)"]
    for item, result in done:
        m = item.mutations[0]
        where = f"{item.job_id} {m.module_path}:{m.start_pos[0]} {_operator(item)}"
        if status(result) == "equivalent":
            reason = (result.output or "").removeprefix(EQUIVALENT_PREFIX)
            equivalents.append(f"{where}: {reason}")
        elif status(result) != "killed":
            details.append(
                f"\n== {status(result)} {where} in {m.definition_name}\n{_short(result.diff)}"
            )
    text = "\n".join([summary, *details, *equivalents])
    REPORT.write_text(text + "\n", encoding="utf-8")
    print(f"\n{summary}\nsurvivors and their diffs: {REPORT.relative_to(ROOT)}")


def _short(diff: str | None) -> str:
    return "\n".join(line for line in (diff or "").splitlines() if not line.startswith("---"))


# ---- commands --------------------------------------------------------------------------------


def command_run() -> None:
    started = time.monotonic()
    copy_tree()
    select = Selector(*map_coverage())
    create_session()
    with use_db(str(SESSION), WorkDB.Mode.open) as db:
        run_mutants(db, sorted(db.pending_work_items, key=_order), select)
        report(db, time.monotonic() - started)


def command_resume() -> None:
    copy_tree()
    _check_targets_unchanged()
    select = Selector(*map_coverage())
    with use_db(str(SESSION), WorkDB.Mode.open) as db:
        run_mutants(db, sorted(db.pending_work_items, key=_order), select)
        report(db)


def command_rerun(ids: Iterable[str]) -> None:
    """Refresh the copy's tests and the coverage map, then run the mutants again."""
    copy_tree()
    _check_targets_unchanged()
    select = Selector(*map_coverage())
    wanted = tuple(ids)
    with use_db(str(SESSION), WorkDB.Mode.open) as db:
        done = db.completed_work_items
        if wanted:
            items = [i for i, _ in done if i.job_id.startswith(wanted)]
        else:
            again = ("survived", "not covered", "equivalent")
            items = [i for i, r in done if status(r) in again]
        run_mutants(db, sorted(items, key=_order), select)
        report(db)


def _check_targets_unchanged() -> None:
    if not SESSION.exists() or json.loads(HASHES.read_text(encoding="utf-8")) != target_hashes():
        sys.exit("the mutated modules changed since the session was made: run `make mutate`")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__)
    commands = ["run", "resume", "rerun", "report"]
    parser.add_argument("command", nargs="?", default="run", choices=commands)
    parser.add_argument("ids", nargs="*", help="job IDs (or prefixes) for rerun")
    args = parser.parse_args(argv)
    if args.command == "run":
        command_run()
    elif args.command == "resume":
        command_resume()
    elif args.command == "rerun":
        command_rerun(args.ids)
    else:
        with use_db(str(SESSION), WorkDB.Mode.open) as db:
            report(db)


if __name__ == "__main__":
    main()
