"""The simulator's fault kinds: one pydantic model each, told apart by `type` (a discriminated
union). Imported only when a fault is validated (`simfaults.validate_fault`: scenarios,
`inject`); errors keep the simulator's own style (`faults[0].op: 'x' is not one of ...`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from workflows.backends import base

JobOp = Literal[
    "enter_maintenance",
    "exit_maintenance",
    "move_vm",
    "start_vm",
    "save_vm",
    "shutdown_vm",
    "reboot_host",
]
CallOp = JobOp | Literal["inventory", "job", "find_job", "any"]
Times = Annotated[int, Field(gt=0)]


class _Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class JobFails(_Fault):
    """The next `op` job (on `target`, a host or VM) fails without effect."""

    type: Literal["job_fails"]
    op: JobOp
    target: str | None = None
    times: Times | None = 1


class JobHangs(_Fault):
    """The next `op` job (on `target`) never finishes."""

    type: Literal["job_hangs"]
    op: JobOp
    target: str | None = None
    times: Times | None = 1


class MigrationFails(_Fault):
    type: Literal["migration_fails"]
    vm: str
    times: Times | None = 1


class HostNeverReturns(_Fault):
    type: Literal["host_never_returns"]
    host: str
    times: Times | None = 1


class DeleteVm(_Fault):
    """Someone else deletes the VM when a request of op `on` is accepted."""

    type: Literal["delete_vm"]
    vm: str
    on: JobOp
    times: Times | None = 1


class MoveVm(_Fault):
    type: Literal["move_vm"]
    vm: str
    to: str
    on: JobOp
    times: Times | None = 1


class SetState(_Fault):
    type: Literal["set_state"]
    vm: str
    state: base.PowerState = Field(strict=False)
    on: JobOp
    times: Times | None = 1


class Transient(_Fault):
    """The next call (of `op`, default any) fails with "connection refused"."""

    type: Literal["transient"]
    op: CallOp = "any"
    times: Times | None = 1


class AuthFails(_Fault):
    """Every call is refused as bad credentials (`times` defaults to for ever)."""

    type: Literal["auth_fails"]
    times: Times | None = None


class StorageRepair(_Fault):
    """The next storage read sees a Storage Spaces Direct repair job running (on `disk`)."""

    type: Literal["storage_repair"]
    disk: str | None = None
    times: Times | None = 1


Fault = Annotated[
    JobFails
    | JobHangs
    | MigrationFails
    | HostNeverReturns
    | DeleteVm
    | MoveVm
    | SetState
    | Transient
    | AuthFails
    | StorageRepair,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Fault)


def validate(raw: Any, where: str) -> dict[str, Any]:
    """One fault, normalised (`times` and a transient's `op` filled in, optional keys left out
    when not given), or ValueError with the message naming the key."""
    try:
        fault = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ValueError(_describe(exc.errors()[0], where)) from None
    given = fault.model_fields_set | {"type", "times"}
    if fault.type == "transient":
        given.add("op")
    out: dict[str, Any] = fault.model_dump(include=given)
    if "state" in out:
        out["state"] = str(out["state"])
    return out


def _choices(ctx: dict[str, Any]) -> str:
    return ", ".join(sorted(re.findall(r"'([^']*)'", ctx.get("expected", ""))))


def _describe(error: Any, where: str) -> str:
    loc = [str(p) for p in error["loc"][1:]]  # the first is the tag, the fault's type
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    key = loc[0] if loc else ""
    at = f"{where}.{key}" if key else where
    if kind == "union_tag_invalid":
        tags = ", ".join(sorted(re.findall(r"'([^']*)'", ctx["expected_tags"])))
        return f"{where}.type: {ctx['tag']!r} is not one of {tags}"
    if key == "times" and kind != "extra_forbidden":
        return f"{at}: expected a positive integer or null, got {given!r}"
    messages = {
        "extra_forbidden": f"{where}: unknown key {key!r}",
        "missing": f"{where}: missing key {key!r}",
        "literal_error": f"{at}: {given!r} is not one of {_choices(ctx)}",
        "enum": f"{at}: {given!r} is not one of {_choices(ctx)}",
        "string_type": f"{at}: expected str, got {given!r}",
    }
    return messages.get(kind, f"{at}: {error['msg']}")
