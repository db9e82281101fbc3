"""How to reach a Windows endpoint over PSRP (WinRM): validated, frozen connection settings.

`from_mapping` turns one `backend.<name>` block of the configuration into `ConnectionSettings`
(the keys and their checks are `workflows.config.Connection`) and raises
`engine.errors.ConfigError` naming the offending key. Passwords are never written in
the configuration: they come from an environment variable (`password_env`) or a file
(`password_file`), and they never appear in `repr`, `str`, logs or error messages.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

from engine import errors

# Keys of a `backend.<name>` block that are backend options, not connection settings.
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "vmm": ("dynamic_memory", "vm_path"),
    "failover": ("node_addresses", "shutdown_timeout_s"),
}
DYNAMIC_MEMORY_CHOICES = ("assigned", "maximum")


class Secret(str):
    """A string that hides itself from repr (and so from dataclass reprs and tracebacks)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """Everything needed to open a PSRP runspace pool on one server.

    `allow_insecure_basic` is a TEST-ONLY knob: it permits Basic authentication over plain HTTP
    without message encryption (`encryption="never"`), which sends the password in clear text.
    It is refused for any server that is not a loopback address.
    """

    server: str
    username: str = ""
    password: Secret = dataclasses.field(repr=False, default=Secret(""))
    port: int | None = None
    ssl: bool = True
    cert_validation: bool = True
    ca_bundle: str | None = None
    auth: str = "negotiate"
    configuration_name: str | None = None
    operation_timeout_s: float = 20.0
    connection_timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    allow_insecure_basic: bool = False
    negotiate_delegate: bool = False
    """Kerberos delegation (the second hop, e.g. a failover node reaching the other nodes)."""

    def __post_init__(self) -> None:
        if not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (5986 if self.ssl else 5985)

    @property
    def encryption(self) -> str:
        return "never" if self.allow_insecure_basic else "auto"

    def for_server(self, server: str) -> ConnectionSettings:
        """The same settings aimed at another server (e.g. a cluster node)."""
        return dataclasses.replace(self, server=server)

    def for_address(self, address: str) -> ConnectionSettings:
        """The same settings aimed at `host` or `host:port`."""
        server, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
        if port:
            return dataclasses.replace(self, server=server, port=int(port))
        return dataclasses.replace(self, server=address)

    @property
    def password_or_none(self) -> str | None:
        """The password, or None when there is none: pyspnego reads only None as "use the
        Kerberos credential cache (kinit, keytab)"; an empty string would be sent."""
        return str(self.password) or None

    def wsman_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `pypsrp.wsman.WSMan` (contains the password: never log it)."""
        validation: bool | str = self.cert_validation
        if self.cert_validation and self.ca_bundle:
            validation = self.ca_bundle
        op_timeout = max(1, int(self.operation_timeout_s))
        return {
            "server": self.server,
            "port": self.effective_port,
            "username": self.username or None,
            "password": self.password_or_none,
            "ssl": self.ssl,
            "auth": self.auth,
            "cert_validation": validation,
            "encryption": self.encryption,
            "operation_timeout": op_timeout,
            "connection_timeout": self.connection_timeout_s,
            "read_timeout": max(self.read_timeout_s, op_timeout + 5),
            **({"negotiate_delegate": True} if self.negotiate_delegate else {}),
        }


def backend_options(data: Mapping[str, object], where: str) -> dict[str, Any]:
    """The validated backend options of a `backend.<name>` block (see BACKEND_OPTIONS)."""
    name = where.rsplit(".", 1)[-1]
    out: dict[str, Any] = {}
    for key in BACKEND_OPTIONS.get(name, ()):
        if key not in data:
            continue
        val = data[key]
        if key == "node_addresses":
            if not isinstance(val, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in val.items()
            ):
                raise errors.ConfigError(f"{where}.{key}: must be a mapping of node to address")
            out[key] = {k.lower(): v for k, v in val.items()}
        elif key.endswith("_s"):
            if isinstance(val, bool) or not isinstance(val, int | float) or val <= 0:
                raise errors.ConfigError(f"{where}.{key}: must be a positive number of seconds")
            out[key] = float(val)
        elif not isinstance(val, str) or not val:
            raise errors.ConfigError(f"{where}.{key}: must be a non-empty string")
        elif key == "dynamic_memory" and val not in DYNAMIC_MEMORY_CHOICES:
            choices = ", ".join(DYNAMIC_MEMORY_CHOICES)
            raise errors.ConfigError(f"{where}.{key}: must be one of {choices}")
        else:
            out[key] = val
    return out


def _connection_part(data: Mapping[str, object], where: str) -> dict[str, object]:
    name = where.rsplit(".", 1)[-1]
    options = set(BACKEND_OPTIONS.get(name, ())) if where.startswith("backend.") else set()
    return {k: v for k, v in data.items() if k not in options}


def from_mapping(
    data: Mapping[str, object], where: str, environ: Mapping[str, str]
) -> ConnectionSettings:
    """Validate one configuration block (e.g. `backend.vmm`) into ConnectionSettings."""
    from workflows import config

    if where.startswith("backend."):
        backend_options(data, where)
    model = config.validate(_connection_part(data, where), config.Connection, where)
    return from_model(model, where, environ)


def validate(data: Mapping[str, object], where: str) -> None:
    """Everything `from_mapping` checks except the secret itself, which is read only when the
    connection is used (so a password variable set only for `start` does not fail `runs`)."""
    from workflows import config

    if where.startswith("backend."):
        backend_options(data, where)
    config.validate(_connection_part(data, where), config.Connection, where)


def from_model(model: Any, where: str, environ: Mapping[str, str]) -> ConnectionSettings:
    """ConnectionSettings from a validated `workflows.config.Connection`, its secret read now."""
    return ConnectionSettings(
        server=model.server,
        username=model.username or "",
        password=_resolve_password(model, where, environ),
        port=model.port,
        ssl=model.ssl,
        cert_validation=model.cert_validation,
        ca_bundle=model.ca_bundle,
        auth=model.auth,
        configuration_name=model.configuration_name,
        operation_timeout_s=model.operation_timeout_s,
        connection_timeout_s=model.connection_timeout_s,
        read_timeout_s=model.read_timeout_s,
        allow_insecure_basic=model.allow_insecure_basic or model.encryption == "never",
        negotiate_delegate=model.negotiate_delegate,
    )


def _resolve_password(model: Any, where: str, environ: Mapping[str, str]) -> Secret:
    env_name, file_name = model.password_env, model.password_file
    if env_name:
        if env_name not in environ:
            raise errors.ConfigError(
                f"{where}.password_env: environment variable {env_name} is not set"
            )
        return Secret(environ[env_name])
    if file_name:
        path = pathlib.Path(file_name)
        try:
            return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise errors.ConfigError(
                f"{where}.password_file: cannot read {file_name}: {exc.strerror}"
            ) from None
    return Secret("")
