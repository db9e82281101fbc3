"""`nodepatch doctor --survey FILE`: record, read-only, what this project could not check
without a real site, and name every difference from what the backends expect.

`record` reads (never writes): the negotiated mechanism; for VMM every property of the
cluster's hosts (one in maintenance included, if any), of up to `MAX_VMS` VMs and of the
running and recent jobs; for a failover cluster the cluster, its nodes, each node's VMs, the
Cluster-Aware Updating role and Storage Spaces Direct; on one node (when a node-side patcher is
configured) the ConfigMgr client's classes. Properties are read with `Select-Object -Property *`
at default serialization depth, exactly as the backends read them. `compare` turns a record
into one line per mismatch; docs/windows-facts.md says which fact each one checks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from engine import errors
from workflows.backends import connection, failover, psrp, vmm
from workflows.patchers import configmgr

MAX_VMS = 20
CM_CLASSES = ("CCM_SoftwareUpdate", "CCM_SoftwareUpdatesManager", "CCM_ClientUtilities")
KNOWN_VM_STATUSES = frozenset({*vmm.STATUS_MAP, "undermigration", "migrationfailed"})
KNOWN_JOB_STATUSES = frozenset({*vmm.JOB_STATUS_MAP})


def _all(cmds: list[psrp.Cmd]) -> list[psrp.Cmd]:
    return [*cmds, psrp.Cmd("Select-Object", {"Property": ["*"]})]


def _rows(session: psrp.Session, cmds: list[psrp.Cmd]) -> list[dict[str, Any]] | str:
    """Plain property maps, or the error as text (recorded, not raised)."""
    try:
        return [psrp.props(r) for r in session.run(_all(cmds))]
    except (errors.BackendError, errors.TransientBackendError) as exc:
        return f"error: {exc}"


def record(
    settings: connection.ConnectionSettings,
    *,
    kind: str,
    cluster: str | None,
    options: Mapping[str, Any] | None = None,
    node_settings: Callable[[str], connection.ConnectionSettings] | None = None,
) -> dict[str, Any]:
    """The survey document (JSON-ready)."""
    options = dict(options or {})
    on_open = [psrp.Cmd("Get-SCVMMServer", {"ComputerName": "localhost"})] if kind == "vmm" else []
    session = psrp.Session(settings, on_open=on_open)
    doc: dict[str, Any] = {
        "taken": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kind": kind,
        "cluster": cluster,
        "auth": settings.auth,
    }
    try:
        session.open()
        doc["mechanism"] = session.mechanism()
        doc.update(_vmm(session, cluster) if kind == "vmm" else _failover(session))
    finally:
        session.close()
    hosts = doc.get("hosts")
    first = next(iter(hosts), None) if isinstance(hosts, list) else None
    if node_settings is not None and first is not None:
        node = str(first.get("ComputerName") or first.get("Name") or "").split(".", 1)[0]
        if node:
            doc["node"] = _node(node_settings(node), node)
    return doc


def _vmm(session: psrp.Session, cluster: str | None) -> dict[str, Any]:
    clusters = _rows(session, [psrp.Cmd("Get-SCVMHostCluster")])
    out: dict[str, Any] = {"clusters": clusters}
    chosen = None
    if isinstance(clusters, list):
        chosen = next(
            (c for c in clusters if cluster and vmm._same_name(str(c.get("Name")), cluster)),
            clusters[0] if clusters and not cluster else None,
        )
    if chosen is not None:
        by_id = psrp.Cmd("Get-SCVMHostCluster", {"ID": vmm._guid(str(chosen["ID"]), "cluster")})
        out["hosts"] = _rows(session, [by_id, psrp.Cmd("Get-SCVMHost")])
        vms = _rows(session, [by_id, psrp.Cmd("Get-SCVMHost"), psrp.Cmd("Get-SCVirtualMachine")])
        out["vms"] = vms[:MAX_VMS] if isinstance(vms, list) else vms
    out["running_jobs"] = _rows(session, [psrp.Cmd("Get-SCJob", {"Running": True})])
    out["recent_jobs"] = _rows(session, [psrp.Cmd("Get-SCJob", {"Newest": 24})])[:50]
    return out


def _failover(session: psrp.Session) -> dict[str, Any]:
    out: dict[str, Any] = {
        "clusters": _rows(session, [psrp.Cmd("Get-Cluster")]),
        "hosts": _rows(session, [psrp.Cmd("Get-ClusterNode")]),
        "vms": _rows(session, [psrp.Cmd("Get-VM")]),
        "cau": _rows(session, [psrp.Cmd("Get-CauClusterRole", {"ErrorAction": "Stop"})]),
    }
    storage = _rows(session, [psrp.Cmd(failover.STORAGE_SCRIPT, {}, script=True)])
    out["s2d"] = storage
    return out


def _node(settings: connection.ConnectionSettings, node: str) -> dict[str, Any]:
    session = psrp.Session(settings)
    try:
        classes = _rows(
            session,
            [psrp.Cmd("Get-CimClass", {"Namespace": configmgr.NAMESPACE, "ClassName": "CCM_*"})],
        )
        names = (
            [str(c.get("CimClassName")) for c in classes] if isinstance(classes, list) else classes
        )
        return {"name": node, "mechanism": _mechanism(session), "configmgr_classes": names}
    finally:
        session.close()


def _mechanism(session: psrp.Session) -> str:
    try:
        session.open()
    except (errors.BackendError, errors.TransientBackendError) as exc:
        return f"error: {exc}"
    return session.mechanism()


# -- comparison ----------------------------------------------------------------------------------


def compare(doc: Mapping[str, Any]) -> list[str]:
    """One plain line per difference between the record and what the backends expect."""
    found: list[str] = []
    if doc.get("auth") == "negotiate" and doc.get("mechanism") == "ntlm":
        found.append(
            "negotiate fell back to NTLM: Kerberos is not in use "
            "(pip install 'nodepatch[kerberos]', kinit)"
        )
    if doc.get("kind") == "vmm":
        found += _missing(doc, "hosts", vmm.HOST_FIELDS, "VMM host")
        found += _missing(doc, "vms", vmm.VM_FIELDS, "VMM VM")
        found += _missing(doc, "running_jobs", vmm.JOB_FIELDS, "VMM job")
        found += _missing(doc, "recent_jobs", vmm.JOB_FIELDS, "VMM job")
        found += _values(doc, "vms", "Status", KNOWN_VM_STATUSES, "VM Status")
        found += _values(
            doc, "vms", "VirtualMachineState", frozenset(vmm.STATUS_MAP), "VirtualMachineState"
        )
        found += _values(doc, "recent_jobs", "Status", KNOWN_JOB_STATUSES, "job Status")
        found += _maintenance(doc)
    else:
        found += _missing(doc, "hosts", failover.NODE_FIELDS, "cluster node")
        found += _missing(doc, "vms", failover.VM_FIELDS, "Hyper-V VM")
        found += _values(doc, "vms", "State", frozenset(failover.VM_STATES), "Hyper-V VM State")
    node = doc.get("node")
    if isinstance(node, Mapping) and isinstance(node.get("configmgr_classes"), str):
        found.append(
            f"ConfigMgr client on {node.get('name')}: cannot read {configmgr.NAMESPACE} "
            f"({node['configmgr_classes']}); the configmgr patcher cannot work there"
        )
    if isinstance(node, Mapping) and isinstance(node.get("configmgr_classes"), list):
        absent = [c for c in CM_CLASSES if c not in node["configmgr_classes"]]
        if absent:
            found.append(
                f"ConfigMgr client on {node.get('name')}: classes missing: {', '.join(absent)} "
                "(the configmgr patcher cannot work there)"
            )
    return found


def _missing(doc: Mapping[str, Any], key: str, fields: list[str], what: str) -> list[str]:
    rows = doc.get(key)
    if isinstance(rows, str):
        return [f"could not read {key}: {rows}"]
    if not rows:
        return []
    absent = [f for f in fields if all(f not in r for r in rows)]
    return [f"{what} has no property {f} (the backend reads it)" for f in absent]


def _values(
    doc: Mapping[str, Any], key: str, field: str, known: frozenset[str], what: str
) -> list[str]:
    rows = doc.get(key)
    if not isinstance(rows, list):
        return []
    seen = {str(r.get(field)) for r in rows if r.get(field) is not None}
    odd = sorted(v for v in seen if v.replace(" ", "").lower() not in known)
    return [
        f"{what} value {v!r} is not one the backend knows (treated as not safe / failed)"
        for v in odd
    ]


def _maintenance(doc: Mapping[str, Any]) -> list[str]:
    """A host not available for placement whose OverallState does not say maintenance (or the
    other way round) means maintenance is shown some other way on this VMM."""
    rows = doc.get("hosts")
    if not isinstance(rows, list):
        return []
    out = []
    for h in rows:
        overall = str(h.get("OverallState") or "").lower()
        placeable = h.get("AvailableForPlacement")
        if "maintenance" in overall and placeable:
            out.append(
                f"host {h.get('Name')}: OverallState {overall!r} but AvailableForPlacement is true"
            )
        if str(h.get("MaintenanceHost")).lower() == "true" and "maintenance" not in overall:
            out.append(
                f"host {h.get('Name')}: MaintenanceHost is true "
                "(a designated maintenance host; ignored)"
            )
    return out
