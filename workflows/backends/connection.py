"""How to reach a Windows endpoint over PSRP (WinRM): validated, frozen connection settings.

`from_mapping` turns one `backend.<name>` block of the configuration into `ConnectionSettings`
and raises `engine.errors.ConfigError` naming the offending key. Passwords are never written in
the configuration: they come from an environment variable (`password_env`) or a file
(`password_file`), and they never appear in `repr`, `str`, logs or error messages.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
from collections.abc import Mapping
from typing import Any

from engine import errors

AUTH_METHODS = ("negotiate", "kerberos", "credssp", "ntlm", "basic")
ENCRYPTION_MODES = ("auto", "always", "never")
LOOPBACK_NAMES = ("localhost",)

_STR_KEYS = ("server", "username", "password_env", "password_file", "ca_bundle", "auth")
_OPTIONAL_STR_KEYS = ("configuration_name", "encryption")
_BOOL_KEYS = ("ssl", "cert_validation", "allow_insecure_basic", "negotiate_delegate")
_INT_KEYS = ("port",)
_FLOAT_KEYS = ("operation_timeout_s", "connection_timeout_s", "read_timeout_s")
KNOWN_KEYS = frozenset(
    (*_STR_KEYS, *_OPTIONAL_STR_KEYS, *_BOOL_KEYS, *_INT_KEYS, *_FLOAT_KEYS, "password")
)
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


def is_loopback(server: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: the only places the test-only knob is allowed."""
    if server.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(server).is_loopback
    except ValueError:
        return False


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
        _check_combination(self, "connection")

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


def _check_combination(s: ConnectionSettings, where: str) -> None:
    if s.auth not in AUTH_METHODS:
        raise errors.ConfigError(f"{where}.auth: must be one of {', '.join(AUTH_METHODS)}")
    if s.allow_insecure_basic and not is_loopback(s.server):
        raise errors.ConfigError(
            f"{where}.allow_insecure_basic: test-only, refused for non-loopback server {s.server!r}"
        )
    if s.auth == "basic" and not s.ssl and not s.allow_insecure_basic:
        raise errors.ConfigError(f"{where}.auth: basic is only allowed with ssl: true")
    if s.port is not None and not 0 < s.port < 65536:
        raise errors.ConfigError(f"{where}.port: must be between 1 and 65535")
    for name in _FLOAT_KEYS:
        if getattr(s, name) <= 0:
            raise errors.ConfigError(f"{where}.{name}: must be positive")


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
    if where.startswith("backend."):
        backend_options(data, where)
    values = _checked_values(_connection_part(data, where), where)
    return _settings(values, _resolve_password(values, where, environ), where)


def validate(data: Mapping[str, object], where: str) -> None:
    """Everything `from_mapping` checks except the secret itself, which is read only when the
    connection is used (so a password variable set only for `start` does not fail `runs`)."""
    if where.startswith("backend."):
        backend_options(data, where)
    values = _checked_values(_connection_part(data, where), where)
    _password_source(values, where)
    _settings(values, Secret(""), where)


def _checked_values(data: Mapping[str, object], where: str) -> dict[str, Any]:
    if "password" in data:
        raise errors.ConfigError(
            f"{where}.password: passwords are not allowed in the configuration; "
            "use password_env (an environment variable name) or password_file (a path)"
        )
    unknown = sorted(set(data) - KNOWN_KEYS, key=str)
    if unknown:
        raise errors.ConfigError(f"{where}.{unknown[0]}: unknown key")
    values = _typed_values(data, where)
    for required in ("server", "username"):
        if required == "username" and values.get("auth") == "kerberos":
            continue  # the principal of the credential cache (kinit, keytab)
        if not values.get(required):
            raise errors.ConfigError(f"{where}.{required}: required")
    encryption = values.pop("encryption", None)
    if encryption is not None and encryption not in ENCRYPTION_MODES:
        raise errors.ConfigError(
            f"{where}.encryption: must be one of {', '.join(ENCRYPTION_MODES)}"
        )
    if encryption == "never":
        values["allow_insecure_basic"] = True
    return values


def _settings(values: dict[str, Any], password: Secret, where: str) -> ConnectionSettings:
    try:
        return ConnectionSettings(password=password, **values)
    except errors.ConfigError as exc:
        raise errors.ConfigError(str(exc).replace("connection.", f"{where}.", 1)) from None


def _typed_values(data: Mapping[str, object], where: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in data.items():
        values[key] = _check_type(key, value, where)
    return values


def _check_type(key: str, value: object, where: str) -> object:
    if key in _OPTIONAL_STR_KEYS and value is None:
        return None
    if key in _STR_KEYS or key in _OPTIONAL_STR_KEYS:
        if not isinstance(value, str):
            raise errors.ConfigError(f"{where}.{key}: must be a string")
    elif key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise errors.ConfigError(f"{where}.{key}: must be true or false")
    elif key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.ConfigError(f"{where}.{key}: must be an integer")
    elif key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise errors.ConfigError(f"{where}.{key}: must be a number of seconds")
        return float(value)
    return value


def _password_source(values: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """Pop and check (password_env, password_file): one of them, unless Kerberos needs neither."""
    env_name = values.pop("password_env", None)
    file_name = values.pop("password_file", None)
    if env_name and file_name:
        raise errors.ConfigError(
            f"{where}.password_env: give password_env or password_file, not both"
        )
    if not env_name and not file_name and values.get("auth", "negotiate") != "kerberos":
        raise errors.ConfigError(f"{where}.password_env: give password_env or password_file")
    return env_name, file_name


def _resolve_password(values: dict[str, Any], where: str, environ: Mapping[str, str]) -> Secret:
    env_name, file_name = _password_source(values, where)
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
