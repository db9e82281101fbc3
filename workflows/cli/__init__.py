"""The `nodepatch` command line. Exit codes: 0 Done, 1 Failed or Refused, 2 usage/configuration/
input error, 3 stopped before the end (--until, waiting for a signal, interrupted), 4 busy
(another live process holds the run), 5 Done (or Aborted) with VMs not put back."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from engine import errors
from workflows import settings
from workflows.app import App
from workflows.cli.common import EXIT_BUSY, EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE
from workflows.cli.interrupts import StopNow

log = logging.getLogger("nodepatch")


class Cli(click.Group):
    """Turns every error into one clear line and a documented exit code."""

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


def _die(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"nodepatch: error: {message}", err=True)
    sys.exit(code)


def _progress_sink(enabled: bool) -> Callable[[str], None]:
    def sink(message: str) -> None:
        log.info(message, extra={"action": "progress"})
        if enabled:
            click.echo(f"  {message}", err=True)

    return sink


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
    cfg = settings.load(config_path)
    _setup_logging(cfg.log_file, debug, log_format)
    url = database or cfg.database
    app = App(
        cfg,
        url,
        sim_file,
        creates_database=url == settings.default_database(),
        progress=_progress_sink(sys.stderr.isatty()),
    )
    ctx.obj = app
    ctx.call_on_close(app.close)


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


from workflows.cli import (  # noqa: E402 - the commands
    cycle,
    demo,
    inspect,
    metrics,
    report,
    runs,
    sim,
    webhooks,
    worker,
)

for command in (
    runs.plan_cmd,
    runs.start_cmd,
    runs.resume_cmd,
    runs.signal_cmd,
    runs.abort_cmd,
    runs.release_cmd,
    cycle.cycle_group,
    worker.worker_cmd,
    inspect.status_cmd,
    inspect.runs_cmd,
    inspect.history_cmd,
    inspect.audit_group,
    inspect.doctor_cmd,
    inspect.db_group,
    sim.sim_group,
    demo.demo_cmd,
    report.report_cmd,
    webhooks.webhooks_group,
    metrics.metrics_cmd,
):
    main.add_command(command)
