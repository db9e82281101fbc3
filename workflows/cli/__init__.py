"""The `nodepatch` command line. Exit codes: 0 Done, 1 Failed or Refused, 2 usage/configuration/
input error, 3 stopped before the end (--until, waiting for a signal, interrupted), 4 busy
(another live process holds the run), 5 Done (or Aborted) with VMs not put back."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from engine import errors
from workflows.cli.exits import EXIT_BUSY, EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE
from workflows.cli.interrupts import StopNow


class Cli(click.Group):
    """Turns every error into one clear line and a documented exit code, and loads each
    command from `COMMANDS` only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        module_name, _, attribute = COMMANDS[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{COMMANDS[cmd_name][0]} is not a click command")
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table, without importing a single command."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, _listed(n, self.commands.get(n)).get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        debug = "--debug" in sys.argv
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except StopNow as exc:
            click.echo(
                f"nodepatch: stopped at once; run {exc.run_id} is left as it was at its last "
                f"durable point: continue with `nodepatch resume {exc.run_id}`",
                err=True,
            )
            sys.exit(EXIT_STOPPED)
        except click.Abort:
            _die("interrupted", EXIT_FAILED)
        except click.ClickException as exc:
            _die(exc.format_message(), EXIT_USAGE)
        except (errors.Busy, errors.StaleRun) as exc:
            _die(str(exc), EXIT_BUSY, exc if debug else None)
        except errors.UsageError as exc:
            _die(str(exc), EXIT_USAGE, exc if debug else None)
        except errors.EngineError as exc:
            _die(str(exc), EXIT_FAILED, exc if debug else None)
        except Exception as exc:  # noqa: BLE001 - the edge: no traceback unless --debug
            _die(
                f"internal error: {exc!r} (run with --debug for details)",
                EXIT_FAILED,
                exc if debug else None,
            )


def _listed(name: str, loaded: click.Command | None) -> click.Command:
    if name in COMMANDS:
        return click.Command(name, help=COMMANDS[name][1])
    assert loaded is not None
    return loaded


def _die(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"nodepatch: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=Cli)
@click.option(
    "--config",
    "config_path",
    envvar="NODEPATCH_CONFIG",
    type=click.Path(),
    help="YAML configuration file [env NODEPATCH_CONFIG].",
)
@click.option(
    "--database",
    envvar="NODEPATCH_DATABASE_URL",
    help="Database URL, overrides the config [env NODEPATCH_DATABASE_URL].",
)
@click.option(
    "--sim",
    "sim_file",
    envvar="NODEPATCH_SIM",
    type=click.Path(),
    help="Use the simulated cluster in FILE [env NODEPATCH_SIM].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="NODEPATCH_LOG_FORMAT",
    help="Log lines as text or JSON, each with run_id, workflow, state, action "
    "[env NODEPATCH_LOG_FORMAT].",
)
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    database: str | None,
    sim_file: str | None,
    debug: bool,
    log_format: str,
) -> None:
    """nodepatch: patch Hyper-V / VMM cluster nodes without cutting anyone off."""
    if ctx.invoked_subcommand in STANDALONE:
        return
    from workflows import settings, terminal
    from workflows.app import App

    cfg = settings.load(config_path)
    _setup_logging(cfg.log_file, debug, log_format)
    url = database or cfg.database
    app = App(
        cfg,
        url,
        sim_file,
        creates_database=url == settings.default_database(),
        progress=terminal.progress_sink(terminal.interactive(sys.stderr)),
    )
    ctx.obj = app
    ctx.call_on_close(app.close)
    ctx.call_on_close(terminal.settle)


def _setup_logging(path: str | None, debug: bool, fmt: str = "text") -> None:
    root = logging.getLogger("nodepatch")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if path:
        from workflows import logs

        root.addHandler(logs.handler(_file_handler(Path(path).expanduser()), fmt))


def _file_handler(path: Path) -> logging.Handler:
    """Appends to path, creating its folder; a path that cannot be used is log.file's error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
        raise errors.ConfigError(f"log.file: cannot create folder {path.parent}: {reason}") from exc
    try:
        return logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError(f"log.file: cannot write {path}: {exc.strerror}") from exc


# The commands, loaded only when used: `nodepatch --help` imports none of them. Adding a command
# is one line: its name, "module:attribute", and the start of its help as `--help` lists it
# (tests/test_cli_fast.py checks that it is how the command's docstring begins).
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("workflows.cli.runs:plan_cmd", "Show the per-VM plan for patching NODE."),
    "start": ("workflows.cli.runs:start_cmd", "Start patching NODE of CLUSTER and drive..."),
    "resume": ("workflows.cli.runs:resume_cmd", "Continue RUN where it stopped; a Failed run..."),
    "signal": ("workflows.cli.runs:signal_cmd", "Send signal NAME (patched, abort) to RUN."),
    "abort": ("workflows.cli.runs:abort_cmd", "Abort RUN with a durable compensation..."),
    "release": ("workflows.cli.runs:release_cmd", "Give up on RUN when it cannot finish..."),
    "worker": ("workflows.cli.worker:worker_cmd", "Claim due runs (started with --detach..."),
    "status": ("workflows.cli.inspect:status_cmd", "Show RUN: state, who holds it, time per..."),
    "runs": ("workflows.cli.inspect:runs_cmd", "List runs, newest first."),
    "history": ("workflows.cli.inspect:history_cmd", "The audit trail of RUN: every transition..."),
    "audit": ("workflows.cli.inspect:audit_group", "Check the audit trail."),
    "doctor": ("workflows.cli.inspect:doctor_cmd", "Check the configured connection end to end..."),
    "db": ("workflows.cli.inspect:db_group", "Database schema management."),
    "sim": ("workflows.cli.sim:sim_group", "The simulated cluster (demo, dry runs, tests)."),
    "demo": ("workflows.cli.demo:demo_cmd", "Patch a whole fresh simulated cluster as one..."),
    "cycle": ("workflows.cli.cycle:cycle_group", "Patch a whole cluster: a durable rolling..."),
    "report": ("workflows.cli.report:report_cmd", "The report of RUN (a node run or a cycle)..."),
    "webhooks": ("workflows.cli.webhooks:webhooks_group", "Deliver run events to the..."),
    "metrics": ("workflows.cli.metrics:metrics_cmd", "Print the metrics a worker serves on..."),
    "config": ("workflows.cli.configure:config_group", "Check the configuration file, or..."),
}
STANDALONE = {"config"}  # commands that need no App (and so load no configuration first)
