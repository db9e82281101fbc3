"""Helpers for driving the real `nodepatch` CLI in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAST_CONFIG = """\
engine: {poll_interval_s: 0.005, lease_ttl_s: 10}
retries: {attempts: 3, backoff_s: 0.01, backoff_max_s: 0.05}
timeouts_s: {Patching: 5}
"""


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    """Runs `nodepatch` as a separate process on one database and one simulated cluster."""

    db_url: str
    sim: Path
    config: Path

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The process environment: this shell's, minus its NODEPATCH_*, plus ours."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NODEPATCH_")}
        return environ | {
            "NODEPATCH_DATABASE_URL": self.db_url,
            "NODEPATCH_SIM": str(self.sim),
            "NODEPATCH_CONFIG": str(self.config),
            **(extra or {}),
        }

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "workflows", *args],
            env=self.environ(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)


def make_cli(tmp_path: Path, db_url: str, config: str = FAST_CONFIG) -> Cli:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config, encoding="utf-8")
    return Cli(db_url, tmp_path / "cluster.json", cfg)
