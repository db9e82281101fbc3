"""The rows of a cluster that a process keeps between calls of the simulated cluster, and the
queries that read a cluster: its row (by id, by key, of a host, of a VM) and the hosts, VMs and
open jobs a load reads (see `simrows`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Row = tuple[Any, ...]

HOSTS = (
    "SELECT key, name, memory_mb, maintenance, state, window_reboot, patch_s, reboot_s "
    "FROM hosts WHERE cluster = ? ORDER BY seq"
)
VMS = "SELECT seq, id, name, host, ha, state, memory_mb FROM vms WHERE cluster = ? ORDER BY seq"
OPEN_JOBS = "SELECT id, doc FROM jobs WHERE cluster = ? AND open = 1 ORDER BY seq"
# A clusters row as `Rows.load` takes it, by id, by key, of a host and of a VM.
CLUSTER = "SELECT c.id, c.name, c.finished, c.version FROM clusters c "
CLUSTER_BY_ID = CLUSTER + "WHERE c.id = ?"
CLUSTER_BY_KEY = CLUSTER + "WHERE c.key = ?"
CLUSTER_OF_HOST = CLUSTER + "JOIN hosts h ON h.cluster = c.id WHERE h.key = ?"
CLUSTER_OF_VM = CLUSTER + "JOIN vms v ON v.cluster = c.id WHERE v.id = ?"


@dataclass(frozen=True)
class Cached:
    """A cluster's hosts, VMs and open jobs as stored at one version, as the queries HOSTS, VMS
    and OPEN_JOBS return them."""

    version: int
    hosts: tuple[Row, ...]
    vms: tuple[Row, ...]
    jobs: tuple[Row, ...]
