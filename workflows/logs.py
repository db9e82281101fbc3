"""Log lines as text or as JSON, each carrying `run_id`, `workflow`, `state` and `action`
(null when a line is about no run or names no action).

Fields come from the `extra=` of the call, else from what the runner bound
(`engine.logcontext`). The `nodepatch` logger and everything under it is configured; modules
log under it (`nodepatch.psrp`, `nodepatch.engine`, ...). Secrets are never passed to a log
call, so no formatter needs to scrub them."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from engine import logcontext

FORMATS = ("text", "json")
FIELDS = ("run_id", "workflow", "state", "action")
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    """Fill each record's run fields from the bound context unless the call gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = logcontext.fields()
        for name in FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, bound.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the run fields, any other
    `extra=` field, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({name: getattr(record, name, None) for name in FIELDS})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger message [run_id=... workflow=... state=... action=...]`, naming only
    the fields a line has."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        present = [f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None)]
        return f"{line} [{' '.join(present)}]" if present else line


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def handler(target: logging.Handler, fmt: str) -> logging.Handler:
    """`target` with the run-field filter and the chosen format."""
    target.addFilter(ContextFilter())
    target.setFormatter(formatter(fmt))
    return target
