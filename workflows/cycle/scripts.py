"""Pre- and post-node scripts (CAU's PreUpdateScript / PostUpdateScript), run on the node
through the same remoting as the patchers; on the simulator, the simulated node runs them here."""

from __future__ import annotations

import os
import pathlib
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from engine import errors

OUTPUT_LIMIT = 4000


@dataclass(frozen=True)
class ScriptResult:
    ok: bool
    output: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "output": self.output}


class NodeScripts(Protocol):
    def run(self, cluster: str, node: str, path: str, phase: str) -> ScriptResult: ...


class LocalScripts:
    """The simulator's nodes are this machine: the script runs here (executable file, or a
    shell script), with NODEPATCH_NODE, NODEPATCH_CLUSTER and NODEPATCH_PHASE set."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s

    def run(self, cluster: str, node: str, path: str, phase: str) -> ScriptResult:
        file = pathlib.Path(path)
        if not file.is_file():
            return ScriptResult(False, f"{phase} script {path} not found")
        argv = [str(file)] if os.access(file, os.X_OK) else ["sh", str(file)]
        env = {**os.environ, "NODEPATCH_NODE": node, "NODEPATCH_CLUSTER": cluster}
        env["NODEPATCH_PHASE"] = phase
        try:
            done = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ScriptResult(False, f"{phase} script ran past {self.timeout_s:g}s")
        output = (done.stdout + done.stderr)[-OUTPUT_LIMIT:].strip()
        if done.returncode:
            return ScriptResult(False, f"exit {done.returncode}: {output}".rstrip(": "))
        return ScriptResult(True, output)


class RemoteScripts:
    """A PowerShell file run on the node over PSRP, as the `script` patcher runs one: sent as a
    script with parameters (`-Node`, `-Cluster`, `-Phase`), never spliced into a string. A
    script that writes an error or throws fails."""

    def __init__(self, patcher: Any) -> None:
        self.patcher = patcher  # a workflows.patchers.remote node patcher (its connection)

    def run(self, cluster: str, node: str, path: str, phase: str) -> ScriptResult:
        from workflows.backends import psrp

        try:
            body = pathlib.Path(path).read_text(encoding="utf-8-sig")
        except OSError as exc:
            return ScriptResult(False, f"cannot read {phase} script {path}: {exc.strerror}")
        params = {"Node": node, "Cluster": cluster, "Phase": phase}
        try:
            out = self.patcher._run(node, [psrp.Cmd(body, params, script=True)])
        except errors.BackendError as exc:
            return ScriptResult(False, str(exc))
        return ScriptResult(True, "\n".join(str(o) for o in out)[-OUTPUT_LIMIT:])
