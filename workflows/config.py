"""The configuration's one model tree (pydantic v2): every key, its type, default and limits.

Loaded only when a configuration is read (the defaults need no pydantic): `workflows.settings`
validates a YAML document with `validate(data)` and turns the model into the frozen `Settings`
the rest of the code uses; `nodepatch config schema` prints `Config`'s JSON Schema.

Every model forbids unknown keys and is strict (no "5986" for a port, no `yes` for a boolean).
A validation error becomes one `ConfigError` line: the dotted key, what was expected, and (for
anything but a secret) what was given. Adding a section is one small class and one field of
`Config` (see README, "Configuration").
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine import errors
from workflows import plan as planning

Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(gt=0)]
FilePath = Annotated[str, Field(min_length=1)]
"""A file path; relative ones are made relative to the configuration file when it is read."""


def _refuse(key: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("refused", "{message}", {"key": key, "message": message})


class Model(BaseModel):
    """A configuration block: strict, frozen, and no key it does not know."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)
    unknown: ClassVar[str] = "unknown key"  # how an unknown key is called in this block
    refused: ClassVar[dict[str, str]] = {}  # keys refused with a reason, before anything else

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """An unknown key is named with the keys this block knows (before any other check)."""
        if isinstance(data, dict):
            for key, reason in cls.refused.items():
                if key in data:
                    raise _refuse(key, reason)
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    raise PydanticCustomError(
                        "unknown_key",
                        "{problem} (known: {known})",
                        {"key": key, "problem": cls.unknown, "known": ", ".join(known)},
                    )
        return data


# -- connections (backend.vmm, backend.failover, patcher.<kind>.connection) ---------------------

AuthMethod = Literal["negotiate", "kerberos", "credssp", "ntlm", "basic"]
LOOPBACK_NAMES = ("localhost",)


def is_loopback(server: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only places the test-only knob is allowed."""
    if server.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(server).is_loopback
    except ValueError:
        return False


class Connection(Model):
    """How to reach a Windows endpoint over PSRP (WinRM). The password is never here: it comes
    from the environment variable `password_env` or the file `password_file`."""

    refused: ClassVar[dict[str, str]] = {
        "password": "passwords are not allowed in the configuration; use password_env (an "
        "environment variable name) or password_file (a path)"
    }
    server: str = Field(min_length=1)
    username: str | None = Field(
        default=None, min_length=1, description="required, except with auth: kerberos"
    )
    password_env: str | None = Field(default=None, min_length=1)
    password_file: FilePath | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    ssl: bool = True
    cert_validation: bool = True
    ca_bundle: FilePath | None = None
    auth: AuthMethod = "negotiate"
    configuration_name: str | None = None
    encryption: Literal["auto", "always", "never"] | None = None
    operation_timeout_s: Seconds = 20.0
    connection_timeout_s: Seconds = 30.0
    read_timeout_s: Seconds = 30.0
    allow_insecure_basic: bool = Field(
        default=False, description="test-only; loopback servers only"
    )
    negotiate_delegate: bool = Field(
        default=False, description="Kerberos delegation, for a failover node's second hop"
    )

    @model_validator(mode="after")
    def _combination(self) -> Connection:
        if self.username is None and self.auth != "kerberos":
            raise _refuse("username", "required")
        if self.password_env and self.password_file:
            raise _refuse("password_env", "give password_env or password_file, not both")
        if not (self.password_env or self.password_file) and self.auth != "kerberos":
            raise _refuse("password_env", "give password_env or password_file")
        insecure = self.allow_insecure_basic or self.encryption == "never"
        if insecure and not is_loopback(self.server):
            raise _refuse(
                "allow_insecure_basic",
                f"test-only, refused for non-loopback server {self.server!r}",
            )
        if self.auth == "basic" and not self.ssl and not insecure:
            raise _refuse("auth", "basic is only allowed with ssl: true")
        return self


class NodeConnection(Connection):
    """A patcher's connection to the node it patches: `server` defaults to the node's name."""

    server: str = Field(default="localhost", min_length=1)


# -- backends ---------------------------------------------------------------------------------


class SimulatedBlock(Model):
    file: FilePath | None = Field(
        default=None, description="the cluster file made by `nodepatch sim init`"
    )


class VmmBlock(Connection):
    """The VMM server's connection and the VMM backend's options."""

    dynamic_memory: Literal["assigned", "maximum"] | None = Field(
        default=None, description="what capacity counts for Dynamic Memory VMs"
    )
    vm_path: str | None = Field(
        default=None, min_length=1, description="where a non-HA VM moved by `migrate` goes"
    )


class FailoverBlock(Connection):
    """A cluster node's connection and the failover backend's options."""

    node_addresses: dict[str, str] = Field(default_factory=dict)
    shutdown_timeout_s: Seconds | None = None


class _Backends(Model):
    """Every backend block may be present (and is checked); `kind` picks the one used."""

    simulated: SimulatedBlock | None = None
    vmm: VmmBlock | None = None
    failover: FailoverBlock | None = None


class SimulatedBackend(_Backends):
    kind: Literal["simulated"] = "simulated"


class VmmBackend(_Backends):
    kind: Literal["vmm"]
    vmm: VmmBlock


class FailoverBackend(_Backends):
    kind: Literal["failover"]
    failover: FailoverBlock


def _by(key: str, default: str, choices: str) -> Discriminator:
    """Pick a union member by the mapping's `key` (default when absent). Members are tagged
    `<value>` so that the error locations, which name the tag, can drop it."""

    def tag(value: Any) -> str:
        found = value.get(key, default) if isinstance(value, dict) else getattr(value, key, default)
        return f"<{found}>"

    return Discriminator(
        tag,
        custom_error_type="bad_kind",
        custom_error_message=f"must be one of {choices}",
        custom_error_context={"key": key, "choices": choices},
    )


Backend = Annotated[
    Annotated[SimulatedBackend, Tag("<simulated>")]
    | Annotated[VmmBackend, Tag("<vmm>")]
    | Annotated[FailoverBackend, Tag("<failover>")],
    _by("kind", "simulated", "simulated, vmm, failover"),
]


# -- patchers ---------------------------------------------------------------------------------


class SimulatedPatcherBlock(Model):
    patch_seconds: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="simulated install time; default: each host's own, else 60"
    )


class RemotePatcherBlock(Model):
    """A patcher that works on the node itself over its own PSRP connection."""

    connection: NodeConnection
    node_addresses: dict[str, str] = Field(default_factory=dict)
    reboot_timeout_s: Seconds = 1800.0
    install_timeout_s: Seconds = 14400.0
    probe_timeout_s: Seconds = 5.0
    criteria: str = "IsInstalled=0 and IsHidden=0 and Type='Software'"
    task_name: str = "nodepatch-windows-update"
    script_path: FilePath | None = None
    script_parameters: dict[str, Any] = Field(default_factory=dict)
    reboot: Literal["if-required", "always", "never"] = "if-required"


class _Patchers(Model):
    simulated: SimulatedPatcherBlock | None = None
    windows_update: RemotePatcherBlock | None = Field(default=None, alias="windows-update")
    script: RemotePatcherBlock | None = None
    reboot: RemotePatcherBlock | None = None
    configmgr: RemotePatcherBlock | None = None


class AutoPatcher(_Patchers):
    kind: Literal["auto"] = "auto"


class SimulatedPatcher(_Patchers):
    kind: Literal["simulated"]


class ExternalPatcher(_Patchers):
    kind: Literal["external"]


class WindowsUpdatePatcher(_Patchers):
    kind: Literal["windows-update"]
    windows_update: RemotePatcherBlock = Field(alias="windows-update")


class ScriptPatcher(_Patchers):
    kind: Literal["script"]
    script: RemotePatcherBlock


class RebootPatcher(_Patchers):
    kind: Literal["reboot"]
    reboot: RemotePatcherBlock


class ConfigmgrPatcher(_Patchers):
    kind: Literal["configmgr"]
    configmgr: RemotePatcherBlock


Patcher = Annotated[
    Annotated[AutoPatcher, Tag("<auto>")]
    | Annotated[SimulatedPatcher, Tag("<simulated>")]
    | Annotated[ExternalPatcher, Tag("<external>")]
    | Annotated[WindowsUpdatePatcher, Tag("<windows-update>")]
    | Annotated[ScriptPatcher, Tag("<script>")]
    | Annotated[RebootPatcher, Tag("<reboot>")]
    | Annotated[ConfigmgrPatcher, Tag("<configmgr>")],
    _by("kind", "auto", "auto, simulated, external, windows-update, script, reboot, configmgr"),
]


# -- the rest ---------------------------------------------------------------------------------


class Policies(Model):
    non_ha: planning.NonHaPolicy = Field(default=planning.NonHaPolicy.BLOCK, strict=False)
    stopped_ha: planning.StoppedHaPolicy = Field(
        default=planning.StoppedHaPolicy.LEAVE, strict=False
    )
    rebalance_concurrency: Count = 2


class Engine(Model):
    lease_ttl_s: Seconds = 30.0
    poll_interval_s: Seconds = 2.0
    yield_after_s: Seconds = Field(
        default=30.0,
        description="a step waiting on the cluster gives its lease back after this long "
        "(workers and commands driving one run)",
    )


class NodePatchTimeouts(Model):
    """Seconds each node-patch step may take."""

    unknown: ClassVar[str] = "unknown state"
    Preflight: Seconds = 600.0
    Draining: Seconds = 4 * 3600.0
    Patching: Seconds = 4 * 3600.0
    Enabling: Seconds = 3600.0
    Rebalancing: Seconds = 4 * 3600.0


class ClusterCycleTimeouts(Model):
    """Seconds each cluster-cycle step may take (unset: the engine's default)."""

    unknown: ClassVar[str] = "unknown state"
    Preflight: Seconds | None = None
    Rolling: Seconds | None = None
    Aborting: Seconds | None = None


class Timeouts(NodePatchTimeouts):
    """Per workflow (`timeouts_s.node_patch.Draining`); node_patch's states also flat."""

    unknown: ClassVar[str] = "unknown key"
    node_patch: NodePatchTimeouts | None = None
    cluster_cycle: ClusterCycleTimeouts | None = None


class Webhook(Model):
    """One receiver of run events (workflows/webhooks.py): `url` or `url_env` (a Slack or
    Teams URL is itself a secret); the signing secret from `secret_env` or `secret_file`."""

    name: str | None = Field(default=None, min_length=1)
    url: str | None = None
    url_env: str | None = Field(default=None, min_length=1)
    events: list[str] = Field(default_factory=lambda: ["*"])
    secret_env: str | None = Field(default=None, min_length=1)
    secret_file: FilePath | None = None
    timeout_s: Seconds = 10.0
    max_attempts: Count = 10
    backoff_s: Seconds = 5.0
    backoff_max_s: Seconds = 900.0
    format: Literal["json", "slack", "teams"] = "json"

    @model_validator(mode="after")
    def _rules(self) -> Webhook:
        from workflows import webhooks

        if (self.url is None) == (self.url_env is None):
            raise _refuse("", "give exactly one of url, url_env")
        if self.secret_env and self.secret_file:
            raise _refuse("", "give at most one of secret_env, secret_file")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise _refuse("url", "must start with http:// or https://")
        for i, pattern in enumerate(self.events):
            if not webhooks.matches_any(pattern):
                raise _refuse(
                    f"events[{i}]",
                    f"{pattern!r} names no event (known: {', '.join(webhooks.EVENT_NAMES)}; "
                    "* matches any part)",
                )
        return self


class RetryBlock(Model):
    """One step's retries; what it leaves out comes from the flat `retries` keys."""

    attempts: Count | None = None
    backoff_s: Seconds | None = None
    backoff_max_s: Seconds | None = None


class Retries(Model):
    attempts: Count = 3
    backoff_s: Seconds = 5.0
    backoff_max_s: Seconds = 120.0
    node_patch: dict[str, RetryBlock] | None = Field(default=None, description="by state")
    cluster_cycle: dict[str, RetryBlock] | None = Field(default=None, description="by state")


class Log(Model):
    file: FilePath | None = None


Duration = Annotated[str | int | float, Field(description="e.g. 30m, 8h, 1h30m, or seconds")]


class Cycle(Model):
    """`nodepatch cycle` defaults; each option on the command line wins."""

    order: Literal["fewest-vms", "given", "name"] | None = None
    max_parallel: int | str | None = Field(default=None, description="a number, or auto")
    max_failed_nodes: Annotated[int, Field(ge=0)] | None = None
    retries_per_node: Annotated[int, Field(ge=0)] | None = None
    soak: Duration | None = None
    windows: list[str] | None = Field(
        default=None, description='e.g. "Sat 22:00/8h Europe/Berlin", "2026-11-28T22:00+01:00/8h"'
    )
    stop_after: Duration | None = None
    health_check: str | None = Field(default=None, min_length=1)
    health_check_timeout_s: Seconds | None = None
    pre_node_script: FilePath | None = None
    post_node_script: FilePath | None = None
    on_node_failure: Literal["compensate", "leave"] | None = None
    headroom_percent: Annotated[float, Field(strict=False)] | None = Field(
        default=None, description="0 to 99"
    )
    default_node_minutes: Annotated[float, Field(gt=0, strict=False)] | None = None
    poll_s: Annotated[float, Field(gt=0, strict=False)] | None = None
    storage_timeout: Duration | None = None


class Config(Model):
    """The whole configuration file; every key is optional."""

    database: SecretStr | None = Field(
        None, description="SQLAlchemy URL (may hold a password); default: SQLite in XDG state"
    )
    backend: Backend = SimulatedBackend()
    policies: Policies = Policies()
    patcher: Patcher = AutoPatcher()
    engine: Engine = Engine()
    timeouts_s: Timeouts = Timeouts()
    retries: Retries = Retries()
    log: Log = Log()
    cycle: Cycle | None = None
    webhooks: list[Webhook] = Field(default_factory=list)


def validate(data: Any, model: type[Model] = Config, where: str = "") -> Any:
    """`data` validated into `model`, or ConfigError naming the first bad key in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.ConfigError(describe(exc.errors()[0], where)) from None


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# -- one error line -----------------------------------------------------------------------------

_KIND = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def describe(error: Any, where: str = "") -> str:
    """One pydantic error as `dotted.key: what was expected (got what was given)`."""
    loc = [str(p) for p in error["loc"] if not re.fullmatch(r"<.*>", str(p))]
    ctx = error.get("ctx") or {}
    kind, given = error["type"], error.get("input")
    if kind in ("unknown_key", "refused") and ctx["key"]:
        loc.append(str(ctx["key"]))
    elif kind == "bad_kind":
        loc.append(str(ctx["key"]))
        given = given.get(ctx["key"]) if isinstance(given, dict) else given
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join([where, *loc] if where else loc))
    path = path.replace(".[", "[") or "configuration"
    return f"{path}: {_problem(kind, ctx, error['msg'], given, loc)}"


def _problem(kind: str, ctx: dict[str, Any], msg: str, given: Any, loc: list[str]) -> str:
    secret = bool(loc) and loc[-1].startswith("password")
    got = "" if secret or isinstance(given, dict) else f" (got {given!r})"
    if kind in _KIND:
        return f"must be {_KIND[kind]}{got}"
    if kind in ("literal_error", "enum", "bad_kind"):
        choices = ctx.get("choices") or ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
        return f"must be one of {choices}{got}"
    if kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        bounds = {"greater_than": "greater than {gt}", "greater_than_equal": "at least {ge}"}
        text = bounds.get(kind, "at most {le}").format(**{k: _num(v) for k, v in ctx.items()})
        return f"must be {text}{got}"
    if kind in ("unknown_key", "refused"):
        return msg
    plain = {"missing": "required", "string_too_short": "required (not empty)"}
    return plain.get(kind) or msg.removeprefix("Value error, ") + got
