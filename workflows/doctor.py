"""`nodepatch doctor`: check, step by step, that nodepatch can drive the cluster.

`diagnose` runs the checks in order (TCP, TLS, authentication, PowerShell module, cluster,
job rights) and stops at the first failure that makes the later ones meaningless. Each
`Check` says in plain words what worked or what is wrong.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from engine import errors
from workflows.backends import base, connection, failover, psrp, vmm

MODULE_PROBES = {
    "vmm": ("Get-SCVMHost", "VMM (virtualmachinemanager)"),
    "failover": ("Get-ClusterNode", "FailoverClusters"),
}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def diagnose(
    settings: connection.ConnectionSettings,
    *,
    kind: str = "vmm",
    cluster: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[Check]:
    """Run the checks in order; stop after the first failed one. `options` are the backend's
    (`connection.backend_options`), e.g. the failover backend's node_addresses."""
    if kind not in MODULE_PROBES:
        raise errors.UsageError(f"doctor: kind must be one of {', '.join(MODULE_PROBES)}")
    checks: list[Check] = []
    steps: list[Callable[[], Check]] = [lambda: check_tcp(settings)]
    if settings.ssl:
        steps.append(lambda: check_tls(settings))
    session = psrp.Session(settings)
    steps += [
        lambda: check_auth(session),
        lambda: check_module(session, kind),
        lambda: check_cluster(settings, kind, cluster, options or {}),
    ]
    if kind == "vmm":
        steps.append(lambda: check_jobs(session))
    try:
        for step in steps:
            checks.append(step())
            if not checks[-1].ok:
                break
    finally:
        session.close()
    return checks


def diagnose_simulated(
    open_backend: Callable[[], base.ClusterBackend], cluster: str | None
) -> list[Check]:
    """The simulated backend needs no connection, only a valid cluster file (with the cluster)."""
    try:
        backend = open_backend()
    except errors.UsageError as exc:
        return [Check("simulated", False, str(exc))]
    checks = [Check("simulated", True, "the cluster file is valid; no connection is needed")]
    if cluster:
        try:
            inv = backend.inventory(cluster)
        except (errors.BackendError, errors.TransientBackendError) as exc:
            checks.append(Check("cluster", False, str(exc)))
        else:
            names = ", ".join(h.name for h in inv.hosts)
            checks.append(Check("cluster", True, f"{inv.cluster}: {names}"))
    return checks


def _address(settings: connection.ConnectionSettings) -> str:
    return f"{settings.server}:{settings.effective_port}"


def check_tcp(settings: connection.ConnectionSettings) -> Check:
    where = _address(settings)
    try:
        with socket.create_connection(
            (settings.server, settings.effective_port), timeout=settings.connection_timeout_s
        ):
            pass
    except ConnectionRefusedError:
        return Check("tcp", False, f"cannot connect to {where}: connection refused")
    except TimeoutError:
        return Check("tcp", False, f"cannot connect to {where}: timed out")
    except socket.gaierror:
        return Check(
            "tcp", False, f"cannot connect to {where}: unknown host name {settings.server}"
        )
    except OSError as exc:
        return Check("tcp", False, f"cannot connect to {where}: {exc.strerror or exc}")
    return Check("tcp", True, f"{where} accepts connections")


def check_tls(settings: connection.ConnectionSettings) -> Check:
    server = settings.server
    if not settings.cert_validation:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=settings.ca_bundle)
    try:
        with (
            socket.create_connection(
                (server, settings.effective_port), timeout=settings.connection_timeout_s
            ) as raw,
            context.wrap_socket(raw, server_hostname=server) as tls,
        ):
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        return Check("tls", False, f"certificate of {server} is not trusted: {exc.verify_message}")
    except (ssl.SSLError, OSError) as exc:
        return Check("tls", False, f"TLS handshake with {server} failed: {exc}")
    if not settings.cert_validation:
        return Check("tls", True, f"{version} (certificate NOT validated: cert_validation is off)")
    return Check("tls", True, f"{version}, certificate of {server} is trusted")


def check_auth(session: psrp.Session) -> Check:
    missing = psrp.missing_module(session.settings.auth)
    if missing:
        return Check("authentication", False, missing)
    try:
        session.open()
    except errors.AuthenticationFailed:
        return Check("authentication", False, "the server rejected the username or password")
    except (errors.BackendError, errors.TransientBackendError, errors.ConfigError) as exc:
        return Check("authentication", False, f"cannot open a PowerShell session: {exc}")
    user = session.settings.username or "(Kerberos ticket cache)"
    mechanism = session.mechanism()
    detail = f"logged on as {user} ({session.settings.auth}; negotiated: {mechanism})"
    if session.settings.auth == "negotiate" and mechanism == "ntlm":
        detail += (
            "; NTLM, not Kerberos: no delegation, and Kerberos needs gssapi/krb5 "
            "(pip install 'nodepatch[kerberos]') and a ticket (kinit)"
        )
    return Check("authentication", True, detail)


def check_module(session: psrp.Session, kind: str) -> Check:
    cmdlet, module = MODULE_PROBES[kind]
    try:
        found = session.run([psrp.Cmd("Get-Command", {"Name": cmdlet})])
    except (errors.BackendError, errors.TransientBackendError) as exc:
        return Check("module", False, f"the {module} PowerShell module is not available: {exc}")
    if not found:
        return Check("module", False, f"the {module} PowerShell module is not available")
    return Check("module", True, f"{cmdlet} is available")


def check_cluster(
    settings: connection.ConnectionSettings,
    kind: str,
    cluster: str | None,
    options: Mapping[str, Any],
) -> Check:
    if cluster is None:
        return Check("cluster", True, "skipped (no cluster given)")
    backend: vmm.VmmBackend | failover.FailoverBackend
    if kind == "vmm":
        backend = vmm.VmmBackend(settings, **options)
    else:
        backend = failover.FailoverBackend(settings, **options)
    try:
        inv = backend.inventory(cluster)
    except (errors.BackendError, errors.TransientBackendError) as exc:
        return Check("cluster", False, f"cannot read cluster {cluster}: {exc}")
    finally:
        backend.close()
    if not inv.hosts:
        return Check("cluster", False, f"cluster {inv.cluster} shows no nodes to this account")
    down = [h.name for h in inv.hosts if not h.responding]
    detail = f"cluster {inv.cluster}: {len(inv.hosts)} nodes, {len(inv.vms)} VMs"
    if down:
        return Check("cluster", False, f"{detail}; down or unreachable: {', '.join(down)}")
    return Check("cluster", True, detail)


def check_jobs(session: psrp.Session) -> Check:
    try:
        session.run([psrp.Cmd("Get-SCJob", {"Newest": 1})])
    except (errors.BackendError, errors.TransientBackendError) as exc:
        return Check("jobs", False, f"cannot read VMM jobs: {exc}")
    return Check("jobs", True, "VMM jobs are readable")
