"""CLI latency: `nodepatch --help` next to a bare `python -c pass`, and `nodepatch status RUN
--json` next to `python -c "import sqlalchemy"`, measured on the same machine in one run.

Each figure is the best of ROUNDS wall-clock times of a fresh process; the four commands take
turns in every round, so each ratio compares figures taken in the same moments. The CPU time
(user + system) of each process is reported next to it: on a busy machine the wall-clock
ratios wander while the CPU ones stay put. `status` reads a
finished run of a simulated node patch in a fresh SQLite database, without a config file.
Prints both ratios next to their targets and merges `cli_help_ratio` and `cli_status_ratio`
(and the times, in seconds) into bench.json.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import record

ROUNDS = 15
HELP_TARGET, STATUS_TARGET = 5.0, 1.5


def _nodepatch() -> list[str]:
    script = Path(sys.executable).with_name("nodepatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "workflows"]


def _prepare(folder: Path) -> tuple[dict[str, str], str]:
    """A fresh database holding one finished run; the environment that names it. Bytecode is
    cached (in a folder of its own) as in any installation, even where the shell sets
    PYTHONDONTWRITEBYTECODE, so that no process pays for compiling the sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    env["NODEPATCH_DATABASE_URL"] = f"sqlite:///{folder / 'bench.db'}"
    sim = str(folder / "cluster.json")
    for args in (
        ["db", "upgrade"],
        ["sim", "init", "--file", sim, "--hosts", "3", "--vms", "12"],
    ):
        subprocess.run([*_nodepatch(), *args], env=env, check=True, capture_output=True)
    start = subprocess.run(
        [*_nodepatch(), "--sim", sim, "start", "--cluster", "cluster1", "--node", "hv01"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return env, start.stdout.split()[1]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _best(
    commands: dict[str, list[str]], env: dict[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """The best wall-clock and the best CPU time of each command."""
    wall = dict.fromkeys(commands, float("inf"))
    cpu = dict.fromkeys(commands, float("inf"))
    for _ in range(ROUNDS):
        for name, argv in commands.items():
            began, cpu_before = time.perf_counter(), _cpu()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            wall[name] = min(wall[name], time.perf_counter() - began)
            cpu[name] = min(cpu[name], _cpu() - cpu_before)
    return wall, cpu


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="nodepatch-bench-") as tmp:
        env, run_id = _prepare(Path(tmp))
        best, cpu = _best(
            {
                "pass": [sys.executable, "-c", "pass"],
                "help": [*_nodepatch(), "--help"],
                "sqlalchemy": [sys.executable, "-c", "import sqlalchemy"],
                "status": [*_nodepatch(), "status", run_id, "--json"],
            },
            env,
        )
    help_ratio = best["help"] / best["pass"]
    status_ratio = best["status"] / best["sqlalchemy"]
    help_cpu, status_cpu = cpu["help"] / cpu["pass"], cpu["status"] / cpu["sqlalchemy"]
    print(
        f"cli  nodepatch --help        {best['help'] * 1000:6.0f} ms | python -c pass          "
        f"{best['pass'] * 1000:6.0f} ms | ratio {help_ratio:.2f} (target {HELP_TARGET:g}) "
        f"| CPU ratio {help_cpu:.2f}"
    )
    print(
        f"cli  nodepatch status --json {best['status'] * 1000:6.0f} ms | import sqlalchemy      "
        f"{best['sqlalchemy'] * 1000:6.0f} ms | ratio {status_ratio:.2f} "
        f"(target {STATUS_TARGET:g}) | CPU ratio {status_cpu:.2f}"
    )
    record(
        {
            "cli_help_ratio": round(help_ratio, 3),
            "cli_status_ratio": round(status_ratio, 3),
            "cli_help_cpu_ratio": round(help_cpu, 3),
            "cli_status_cpu_ratio": round(status_cpu, 3),
            "cli_help_s": round(best["help"], 4),
            "cli_status_s": round(best["status"], 4),
            "python_pass_s": round(best["pass"], 4),
            "python_import_sqlalchemy_s": round(best["sqlalchemy"], 4),
        }
    )


if __name__ == "__main__":
    main()
