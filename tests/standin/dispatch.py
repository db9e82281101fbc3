"""The stand-in's command runner: a registry of cmdlets and constant scripts, and their I/O.

A handler is `fn(inv: Invocation) -> list[object]`: it reads `inv.params` (case-insensitive
names), `inv.input` (the previous command's output in the pipeline) and `inv.ctx` (the endpoint's
computer name and the runspace's variables); it returns its output objects, writes
non-terminating errors with `inv.error(...)` and raises `Terminating` for a terminating error.
Scripts are looked up by their exact text, so only the constant scripts imported from the
product's modules can run: any other script text is rejected with a terminating error.
Every pipeline received is recorded in `Dispatcher.calls`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

from psrpcore.types import (
    CommandTypes,
    ErrorCategory,
    ErrorCategoryInfo,
    ErrorRecord,
    InvocationInfo,
    NETException,
    PSCustomObject,
)


class Terminating(Exception):
    """Raised by a handler: the pipeline fails with this error record."""

    def __init__(
        self,
        message: str,
        category: str = "NotSpecified",
        *,
        target: str | None = None,
        fqid: str = "StandInError",
        command: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
        self.target = target
        self.fqid = fqid
        self.command = command

    def record(self) -> ErrorRecord:
        return error_record(self.message, self.category, self.target, self.fqid, self.command)


def error_record(
    message: str, category: str, target: str | None, fqid: str, command: str | None
) -> ErrorRecord:
    record = ErrorRecord(
        Exception=NETException(Message=message),
        CategoryInfo=ErrorCategoryInfo(
            Category=ErrorCategory[category], Reason="Exception", TargetName=target or ""
        ),
        TargetObject=target,
        FullyQualifiedErrorId=fqid,
        InvocationInfo=_invocation(command),
    )
    record.serialize_extended_info = command is not None
    return record


def _invocation(command: str | None) -> InvocationInfo | None:
    if command is None:
        return None
    my_command = PSCustomObject(Name=command, CommandType=CommandTypes.Cmdlet, Definition="")
    return InvocationInfo(InvocationName=command, MyCommand=my_command)


class DropConnection(Exception):
    """Raised by a handler: the HTTP connection is closed without an answer."""


class Unauthorized(Exception):
    """Raised by a handler: the request is answered with HTTP 401."""


class Output:
    """Writes to a psrpcore ServerPipeline."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def write(self, obj: Any) -> None:
        self.pipeline.write_output(obj)

    def error(self, exc: Terminating) -> None:
        record = exc.record()
        self.pipeline.write_error(
            record.Exception,
            record.CategoryInfo,
            record.TargetObject,
            record.FullyQualifiedErrorId,
            invocation_info=record.InvocationInfo,
        )

    def warning(self, message: str) -> None:
        self.pipeline.write_warning(message)


@dataclasses.dataclass
class Context:
    computer: str
    variables: dict[str, Any]
    input: list[Any]


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded command: its text (cmdlet name or script), whether a script, parameters."""

    computer: str
    text: str
    is_script: bool
    params: dict[str, Any]


@dataclasses.dataclass
class Invocation:
    name: str
    params: dict[str, Any]
    input: list[Any]
    ctx: Context
    out: Output

    def has(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k in self.params)

    def get(self, name: str, default: Any = None) -> Any:
        for key, val in self.params.items():
            if key.lower() == name.lower():
                return val
        return default

    def error(
        self, message: str, category: str = "NotSpecified", target: str | None = None
    ) -> None:
        """A non-terminating error, or a terminating one under -ErrorAction Stop."""
        exc = Terminating(message, category, target=target, command=self.name)
        action = str(self.get("ErrorAction", "")).lower()
        if action == "stop":
            raise exc
        if action in ("silentlycontinue", "ignore"):
            return
        self.out.error(exc)


Handler = Callable[[Invocation], list[Any]]


class Dispatcher:
    """Runs pipelines of registered cmdlets and constant scripts; records every command."""

    def __init__(self) -> None:
        self.cmdlets: dict[str, Handler] = {}
        self.scripts: dict[str, Handler] = {}
        self.calls: list[Call] = []
        self.before_request: Callable[[str, bytes], str | None] | None = None
        self.convert: Callable[[Any], Any] = lambda obj: obj
        self._lock = threading.Lock()

    def cmdlet(self, name: str, handler: Handler) -> None:
        self.cmdlets[name.lower()] = handler

    def script(self, text: str, handler: Handler) -> None:
        self.scripts[text] = handler

    def register(self, cmdlets: Mapping[str, Handler], scripts: Mapping[str, Handler]) -> None:
        for name, handler in cmdlets.items():
            self.cmdlet(name, handler)
        for text, handler in scripts.items():
            self.script(text, handler)

    def commands(self, name: str) -> list[Call]:
        """Recorded calls of one cmdlet (case-insensitive) or script text."""
        with self._lock:
            return [c for c in self.calls if c.text.lower() == name.lower()]

    def run(self, commands: list[Any], ctx: Context, out: Output) -> None:
        piped: list[Any] = list(ctx.input)
        for command in commands:
            params = {str(k): v for k, v in command.parameters if k is not None}
            positional = [v for k, v in command.parameters if k is None]
            if positional:
                params["__args__"] = positional
            with self._lock:
                self.calls.append(
                    Call(ctx.computer, command.command_text, command.is_script, dict(params))
                )
            handler = self._lookup(command)
            name = "script" if command.is_script else command.command_text
            piped = handler(Invocation(name, params, piped, ctx, out))
        for obj in piped:
            out.write(self.convert(obj))

    def _lookup(self, command: Any) -> Handler:
        if command.is_script:
            handler = self.scripts.get(command.command_text)
            if handler is None:
                raise Terminating("script text not in the stand-in registry", "ParserError")
            return handler
        handler = self.cmdlets.get(command.command_text.lower())
        if handler is None:
            raise Terminating(
                f"The term '{command.command_text}' is not recognized as the name of a cmdlet",
                "ObjectNotFound",
                target=command.command_text,
                fqid="CommandNotFoundException",
            )
        return handler
