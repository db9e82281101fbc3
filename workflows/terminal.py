"""What a person at a terminal sees: rich tables and live progress; plain text otherwise.

Tables (`render.Table`) are drawn with rich when their stream is a terminal, and printed as the
plain aligned text of `str(table)` otherwise (pipes, files, schedulers, tests), so non-terminal
output never changes. Progress on a terminal is a live panel on stderr: the run's current state
and how long it has been in it, and each job in flight (a VM move, the drain, the patch) with its
progress and how long it has been waited for; state changes and notes stay in the scrollback.

`NO_COLOR` (any non-empty value, https://no-color.org) turns off colours and every other style
escape code; `TERM=dumb` means plain text. rich is imported only when something is drawn.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import click

from workflows import render

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

log = logging.getLogger("nodepatch")

STATE_STYLES = {
    "Done": "green",
    "Failed": "bold red",
    "Refused": "yellow",
    "Aborted": "yellow",
    "Abandoned": "magenta",
}


def interactive(stream: IO[str]) -> bool:
    """Whether a person is watching `stream`: a terminal that is not `TERM=dumb`."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except ValueError:  # a closed stream
        return False


def console(stream: IO[str]) -> Console:
    from rich.console import Console

    plain = bool(os.environ.get("NO_COLOR"))
    return Console(
        file=stream, color_system=None if plain else "auto", highlight=False, emoji=False
    )


def echo(item: render.Table | str | None, *, err: bool = False) -> None:
    """Print a table (rich on a terminal, plain text otherwise) or a line."""
    if item is None:
        return
    stream = sys.stderr if err else sys.stdout
    if not isinstance(item, render.Table) or not interactive(stream):
        click.echo(str(item), err=err)
        return
    out = console(stream)
    out.print(rich_table(item))
    if item.note:
        out.print(item.note, markup=False)


def rich_table(table: render.Table) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    drawn = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for header in table.headers:
        drawn.add_column(header, overflow="fold")
    for row in table.cells():
        drawn.add_row(*(Text(cell, style=STATE_STYLES.get(cell, "")) for cell in row))
    return drawn


# -- progress ---------------------------------------------------------------------------------

_TRANSITION = re.compile(r"^(?P<source>\w+) -> (?P<target>\w+)(?::|$)")
_JOB = re.compile(r"^(?P<label>.+?): (?P<percent>\d{1,3})%(?: (?P<message>.*))?$")


@dataclass
class _Job:
    percent: int
    message: str
    since: float


@dataclass
class _Watch:
    """What the live panel shows, from the progress messages alone."""

    state: str | None = None
    since: float = field(default_factory=time.monotonic)
    jobs: dict[str, _Job] = field(default_factory=dict)

    def note(self, message: str) -> bool:
        """Take in one message; True if it belongs in the scrollback (not only the panel)."""
        now = time.monotonic()
        moved = _TRANSITION.match(message)
        if moved:
            self.state, self.since = moved["target"], now
            self.jobs.clear()
            return True
        job = _JOB.match(message)
        if job is None:
            return True
        percent = min(int(job["percent"]), 100)
        if percent >= 100:
            self.jobs.pop(job["label"], None)
            return True
        known = self.jobs.get(job["label"])
        since = known.since if known else now
        self.jobs[job["label"]] = _Job(percent, job["message"] or "", since)
        return False


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class _Panel:
    """The renderable of a watch: re-drawn by Live on every refresh (so the times advance)."""

    def __init__(self, watch: _Watch) -> None:
        self.watch = watch

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        w = self.watch
        head = Text(f"{w.state or 'starting'}", style=STATE_STYLES.get(w.state or "", "bold"))
        head.append(f" for {_seconds(now - w.since)}", style="")
        if w.jobs:
            head.append(f" · {len(w.jobs)} in flight")
        jobs = Table.grid(padding=(0, 2))
        for label, job in w.jobs.items():
            jobs.add_row(
                Text(label),
                ProgressBar(total=100, completed=job.percent, width=20),
                Text(f"{job.percent:3d}%"),
                Text(f"waiting {_seconds(now - job.since)}"),
                Text(job.message, overflow="ellipsis", no_wrap=True),
            )
        return Group(head, jobs) if w.jobs else head


class Progress:
    """The progress sink of the commands that drive runs: every message is logged; on a
    terminal it also feeds the live panel (rich), with state changes and notes kept in the
    scrollback as the plain `  message` lines."""

    def __init__(self, enabled: bool, *, live: bool = True) -> None:
        self.enabled = enabled
        self.live = live
        self.watch = _Watch()
        self._live: Live | None = None
        self._shown: str | None = None  # the line shown last

    def __call__(self, message: str) -> None:
        log.info(message, extra={"action": "progress"})
        if not self.enabled:
            return
        if not self.live:
            if self._fresh(message):
                click.echo(f"  {message}", err=True)
            return
        keep = self.watch.note(message)
        live = self._start()
        if keep and self._fresh(message):
            live.console.print(f"  {message}", markup=False, highlight=False)
        live.refresh()

    def _fresh(self, message: str) -> bool:
        """Whether `message` differs from the line shown last: a step that gives its lease
        back while it waits (a reboot) says what it waits for again at each re-entry, and the
        terminal shows it once (the log keeps every one)."""
        fresh, self._shown = message != self._shown, message
        return fresh

    def _start(self) -> Live:
        if self._live is None:
            from rich.live import Live

            self._live = Live(
                _Panel(self.watch),
                console=console(sys.stderr),
                transient=True,
                refresh_per_second=2,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
            _active.append(self)
        return self._live

    def close(self) -> None:
        """Take the live panel away (before a command prints its result)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self in _active:
            _active.remove(self)


_active: list[Progress] = []


def settle() -> None:
    """Stop every live panel, so what is printed next is not drawn over."""
    for progress in list(_active):
        progress.close()


def progress_sink(enabled: bool, *, live: bool = True) -> Progress:
    """The sink for `App.progress`: on a terminal (`enabled`) a live panel, or with `live`
    False plain `  message` lines (a worker drives several runs at once); otherwise only
    logged."""
    return Progress(enabled, live=live)
