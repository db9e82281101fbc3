"""The report as CSV, for spreadsheets: one row per VM action of every node run. Pure."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

COLUMNS = (
    "run_id",
    "node",
    "vm_id",
    "vm_name",
    "from",
    "to",
    "action",
    "outcome",
    "job_ids",
    "downtime_s",
    "state_before",
    "after_host",
    "after_state",
    "ha",
    "memory_mb",
    "down_at",
    "up_at",
)


def render(report: Mapping[str, Any]) -> str:
    """A header line, then one line per VM action; job IDs separated by spaces."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in report["vm_actions"]:
        writer.writerow([_cell(row, name) for name in COLUMNS])
    return out.getvalue()


def _cell(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if name == "job_ids":
        return " ".join(str(v) for v in value or [])
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _safe(str(value))


def _safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection): a leading =, +, - or @
    of text that is not a number is quoted with an apostrophe."""
    if text[:1] in ("=", "+", "-", "@") and not _number(text):
        return "'" + text
    return text


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
