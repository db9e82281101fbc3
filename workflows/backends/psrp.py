"""Shared pypsrp plumbing: a lazily (re)opened runspace pool, injection-free commands, and errors.

Every remote call is a list of `Cmd`: either a cmdlet (`Cmd("Get-SCVMHost", {"ComputerName":
name})`) or a module-level constant script with a `param()` block whose values travel as
parameters (`Cmd(MOVE_SCRIPT, {...}, script=True)`). Nothing is ever formatted into script text.

Failures become `engine.errors` exceptions: PowerShell error records become `BackendError` with
the record's message, category, target and command; connection trouble becomes
`TransientBackendError` (the pool is reopened on the next call); refused credentials become
`AuthenticationFailed`.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import requests
from pypsrp import exceptions as psrp_exc
from pypsrp.powershell import PowerShell, RunspacePool
from pypsrp.wsman import WSMan

from engine import errors
from workflows.backends import connection

log = logging.getLogger("nodepatch.psrp")  # under the configured logger

ERROR_CATEGORIES = [
    "NotSpecified",
    "OpenError",
    "CloseError",
    "DeviceError",
    "DeadlockDetected",
    "InvalidArgument",
    "InvalidData",
    "InvalidOperation",
    "InvalidResult",
    "InvalidType",
    "MetadataError",
    "NotImplemented",
    "NotInstalled",
    "ObjectNotFound",
    "OperationStopped",
    "OperationTimeout",
    "SyntaxError",
    "ParserError",
    "PermissionDenied",
    "ResourceBusy",
    "ResourceExists",
    "ResourceUnavailable",
    "ReadError",
    "WriteError",
    "FromStdErr",
    "SecurityError",
    "ProtocolError",
    "ConnectionError",
    "AuthenticationError",
    "LimitsExceeded",
    "QuotaExceeded",
    "NotEnabled",
]
WSMAN_ACCESS_DENIED = 5
WSMAN_ACCESS_DENIED_HRESULT = 0x80070005


@dataclasses.dataclass(frozen=True)
class Cmd:
    """One command of a pipeline: a cmdlet name, or a constant script when `script` is True."""

    text: str
    params: Mapping[str, object] = dataclasses.field(default_factory=dict)
    script: bool = False

    @property
    def label(self) -> str:
        return "script" if self.script else self.text


def classify(exc: BaseException, server: str) -> errors.EngineError | None:
    """Map a transport exception to the engine's tree; None if it is not a transport error."""
    if isinstance(exc, psrp_exc.AuthenticationError):
        return errors.AuthenticationFailed(
            f"{server} rejected the username or password", target=server
        )
    if isinstance(exc, psrp_exc.WSManFaultError):
        return _classify_fault(exc, server)
    if isinstance(exc, psrp_exc.WinRMTransportError):
        return _classify_http(exc.code, server)
    return _classify_network(exc, server)


def _classify_network(exc: BaseException, server: str) -> errors.EngineError | None:
    if isinstance(exc, requests.exceptions.SSLError | ssl.SSLError):
        return errors.BackendError(
            f"TLS handshake with {server} failed: {_root(exc)}", target=server
        )
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return errors.TransientBackendError(f"cannot reach {server}: {_root(exc)}")
    if isinstance(exc, ConnectionError | TimeoutError):
        return errors.TransientBackendError(f"cannot reach {server}: {exc}")
    if isinstance(exc, psrp_exc.WinRMError):
        return errors.BackendError(f"{server}: PowerShell remoting error: {exc}", target=server)
    return None


def _classify_http(code: int, server: str) -> errors.EngineError:
    if code in (401, 403):
        return errors.AuthenticationFailed(f"{server} denied access (HTTP {code})", target=server)
    if code >= 500:
        return errors.TransientBackendError(f"{server} answered HTTP {code}")
    return errors.BackendError(f"{server} answered HTTP {code}", target=server)


def _classify_fault(exc: psrp_exc.WSManFaultError, server: str) -> errors.EngineError:
    if exc.code in (WSMAN_ACCESS_DENIED, WSMAN_ACCESS_DENIED_HRESULT):
        return errors.AuthenticationFailed(f"{server} denied access: {exc.reason}", target=server)
    return errors.TransientBackendError(f"{server}: WSMan fault {exc.code}: {exc.reason}")


def _root(exc: BaseException) -> str:
    """The innermost cause's message, which is usually the readable one."""
    inner: BaseException = exc
    for _ in range(10):
        nxt = inner.__cause__ or inner.__context__
        if nxt is None:
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    args = getattr(inner, "args", ())
    if args and isinstance(args[0], str) and len(args) == 1:
        text = args[0]
    return text


def error_from_record(
    record: Any, fallback_command: str, target: str | None
) -> errors.BackendError:
    """A BackendError carrying an ErrorRecord's message, category, target and command."""
    category_no = getattr(record, "category", None)
    category = (
        ERROR_CATEGORIES[category_no]
        if isinstance(category_no, int) and 0 <= category_no < len(ERROR_CATEGORIES)
        else None
    )
    message = str(record) or getattr(record, "message", None) or "unknown error"
    return errors.BackendError(
        message,
        category=category,
        target=getattr(record, "target_name", None) or target,
        command=getattr(record, "command_name", None)
        or getattr(record, "invocation_name", None)
        or fallback_command,
    )


def value(obj: Any) -> Any:
    """Plain Python value of a deserialised object: enums and other complex objects to str."""
    if obj is None or isinstance(obj, str | bool | int | float | uuid.UUID | datetime):
        return obj
    if isinstance(obj, list):
        return [value(o) for o in obj]
    if isinstance(obj, dict):
        return {str(k): value(v) for k, v in obj.items()}
    if hasattr(obj, "adapted_properties") and (obj.adapted_properties or obj.extended_properties):
        return props(obj)
    return str(obj)


def props(obj: Any) -> dict[str, Any]:
    """The adapted and extended (note) properties of a deserialised object, as plain values."""
    if isinstance(obj, dict):
        return {str(k): value(v) for k, v in obj.items()}
    merged: dict[str, Any] = {}
    merged.update(getattr(obj, "adapted_properties", {}) or {})
    merged.update(getattr(obj, "extended_properties", {}) or {})
    return {str(k): value(v) for k, v in merged.items()}


class Session:
    """One server's runspace pool, opened on first use and reopened after a transport error."""

    def __init__(
        self, settings: connection.ConnectionSettings, *, on_open: Sequence[Cmd] = ()
    ) -> None:
        self.settings = settings
        self.on_open = tuple(on_open)
        self._wsman: WSMan | None = None
        self._pool: RunspacePool | None = None

    @property
    def server(self) -> str:
        return self.settings.server

    def run(self, commands: Sequence[Cmd], *, target: str | None = None) -> list[Any]:
        """Run one pipeline; return its output; raise on any error record or transport error."""
        label = " | ".join(c.label for c in commands)
        try:
            pool = self._open()
            ps = PowerShell(pool)
            _build(ps, commands)
            output: list[Any] = ps.invoke()
        except Exception as exc:
            mapped = classify(exc, self.server)
            if mapped is None:
                raise
            self.reset()
            raise mapped from None
        records = list(ps.streams.error)
        _close_quietly(ps)
        if ps.had_errors or records:
            if records:
                raise error_from_record(records[0], commands[-1].label, target)
            raise errors.BackendError(f"{label} failed", target=target, command=label)
        return output

    def open(self) -> None:
        """Open the runspace pool now (authenticates); raises like `run`."""
        try:
            self._open()
        except Exception as exc:
            mapped = classify(exc, self.server)
            if mapped is None:
                raise
            self.reset()
            raise mapped from None

    def _open(self) -> RunspacePool:
        if self._pool is None:
            kwargs = self.settings.wsman_kwargs()
            self._wsman = WSMan(**kwargs)
            pool = RunspacePool(self._wsman, **_pool_kwargs(self.settings))
            try:
                pool.open()
                for cmd in self.on_open:
                    _invoke_checked(pool, [cmd])
            except BaseException:
                self.reset()
                raise
            self._pool = pool
        return self._pool

    def reset(self) -> None:
        """Forget the pool (without talking to the server); the next call opens a new one."""
        if self._wsman is not None:
            try:
                self._wsman.close()
            except Exception:
                log.debug("ignoring error while closing transport", exc_info=True)
        self._wsman = None
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            try:
                self._pool.close()
            except Exception:
                log.debug("ignoring error while closing runspace pool", exc_info=True)
        self.reset()


def _invoke_checked(pool: RunspacePool, commands: Sequence[Cmd]) -> None:
    """Run set-up commands (e.g. Get-SCVMMServer) in a fresh pool; any error aborts the open."""
    ps = PowerShell(pool)
    _build(ps, commands)
    ps.invoke()
    records = list(ps.streams.error)
    _close_quietly(ps)
    if ps.had_errors or records:
        label = commands[0].label
        if records:
            raise error_from_record(records[0], label, None)
        raise errors.BackendError(f"{label} failed", command=label)


def _pool_kwargs(settings: connection.ConnectionSettings) -> dict[str, Any]:
    if settings.configuration_name:
        return {"configuration_name": settings.configuration_name}
    return {}


def _build(ps: Any, commands: Sequence[Cmd]) -> None:
    for cmd in commands:
        if cmd.script:
            ps.add_script(cmd.text)
        else:
            ps.add_cmdlet(cmd.text)
        for name, val in cmd.params.items():
            ps.add_parameter(name, val)


def _close_quietly(ps: Any) -> None:
    try:
        ps.close()
    except Exception:
        log.debug("ignoring error while closing pipeline", exc_info=True)
