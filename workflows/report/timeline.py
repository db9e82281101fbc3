"""The Gantt-like timeline of a report, pure: one row per node (and one for the cycle itself),
one bar per stay in a state of each of its runs, drawn as inline SVG."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDTH, LABEL_W, ROW_H, AXIS_H, PAD = 1100, 150, 28, 26, 8
TICKS = 6


@dataclass(frozen=True)
class Bar:
    state: str
    start: dt.datetime
    end: dt.datetime
    run_id: str
    final: bool  # the state the run ended in: a mark, not a stay


@dataclass(frozen=True)
class Row:
    label: str
    node: str | None
    bars: tuple[Bar, ...]


def rows(report: Mapping[str, Any]) -> list[Row]:
    now = dt.datetime.fromisoformat(report["report"]["generated_at"])
    out = []
    if report["kind"] == "cycle":
        out.append(Row("cycle", None, _bars(report["run"], report["states"], now)))
    for node in report["nodes"]:
        bars = tuple(b for run in node["runs"] for b in _bars(run, run["states"], now))
        out.append(Row(node["node"], node["node"], bars))
    return out


def _bars(
    run: Mapping[str, Any], stays: Sequence[Mapping[str, Any]], now: dt.datetime
) -> tuple[Bar, ...]:
    finished = run.get("finished_at") is not None
    bars = []
    for stay in stays:
        start = dt.datetime.fromisoformat(stay["entered"])
        final = stay["left"] is None and finished
        end = dt.datetime.fromisoformat(stay["left"]) if stay["left"] else (start if final else now)
        bars.append(Bar(str(stay["state"]), start, end, str(run["run_id"]), final))
    return tuple(bars)


def svg(table: Sequence[Row], colour: Callable[[str], str], now_label: str) -> str:
    """The timeline: a time axis (UTC) and a labelled row per node; every bar has a tooltip."""
    times = [t for row in table for b in row.bars for t in (b.start, b.end)]
    height = AXIS_H + ROW_H * max(len(table), 1) + PAD
    if not times:
        return f'<p class="muted">no state changes to show (as of {html.escape(now_label)})</p>'
    t0, t1 = min(times), max(times)
    span = max((t1 - t0).total_seconds(), 1e-3)
    plot = WIDTH - LABEL_W - PAD

    def x(at: dt.datetime) -> float:
        return LABEL_W + plot * (at - t0).total_seconds() / span

    parts = [
        f'<svg class="timeline" id="timeline" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="timeline of nodes and states">',
        *_axis(t0, span, plot, height),
    ]
    for i, row in enumerate(table):
        parts.append(_row(row, AXIS_H + i * ROW_H, x, colour))
    parts.append("</svg>")
    return "".join(parts)


def _axis(t0: dt.datetime, span: float, plot: float, height: int) -> list[str]:
    out = []
    for i in range(TICKS + 1):
        at = t0 + dt.timedelta(seconds=span * i / TICKS)
        px = LABEL_W + plot * i / TICKS
        anchor = "start" if i == 0 else ("end" if i == TICKS else "middle")
        label = _tick(at.astimezone(dt.UTC), span)
        out.append(
            f'<line x1="{px:.1f}" y1="{AXIS_H - 6}" x2="{px:.1f}" y2="{height - PAD}" '
            'stroke="#dde2ea" stroke-width="1"/>'
            f'<text x="{px:.1f}" y="{AXIS_H - 10}" font-size="11" fill="#556" '
            f'text-anchor="{anchor}">{label}</text>'
        )
    return out


def _tick(at: dt.datetime, span: float) -> str:
    """A tick's label, as fine as the span needs (UTC)."""
    if span < 60:
        return f"{at:%H:%M:%S}.{at.microsecond // 1000:03d}"
    return f"{at:%H:%M:%S}" if span < 86400 else f"{at:%m-%d %H:%M}"


def _row(
    row: Row, top: int, x: Callable[[dt.datetime], float], colour: Callable[[str], str]
) -> str:
    node = f' data-node="{html.escape(row.node, quote=True)}"' if row.node else ""
    label = html.escape(row.label)
    parts = [
        f'<g class="row"{node}>',
        f'<text class="node-label" x="{LABEL_W - 8}" y="{top + ROW_H / 2 + 4:.1f}" '
        f'font-size="13" text-anchor="end" fill="#1d2330">{label}</text>',
    ]
    for bar in row.bars:
        left = x(bar.start)
        width = 3.0 if bar.final else max(x(bar.end) - left, 1.5)
        seconds = (bar.end - bar.start).total_seconds()
        when = f"{bar.start.astimezone(dt.UTC):%H:%M:%S}"
        tip = f"{row.label} {bar.state} at {when} UTC"
        if not bar.final:
            tip += f" for {seconds:.1f} s"
        tip += f" (run {bar.run_id})"
        parts.append(
            f'<rect x="{left:.2f}" y="{top + 5}" width="{width:.2f}" height="{ROW_H - 10}" '
            f'rx="2" fill="{colour(bar.state)}" data-state="{html.escape(bar.state, quote=True)}">'
            f"<title>{html.escape(tip)}</title></rect>"
        )
    parts.append("</g>")
    return "".join(parts)
