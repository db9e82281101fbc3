"""bench.json at the repository root: one JSON object of benchmark figures by name.

Every benchmark merges its own names into the file, so `make bench` leaves one object holding
the figures of all the benchmarks it ran (and of earlier runs of those it did not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

BENCH_JSON = Path(__file__).resolve().parent.parent / "bench.json"


def record(figures: Mapping[str, float], path: Path = BENCH_JSON) -> None:
    """Merge `figures` into the object in `path` (created if missing), replacing it atomically."""
    merged: dict[str, object] = {}
    if path.exists():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise SystemExit(f"{path} does not hold a JSON object; move it away")
            merged = loaded
    merged.update(figures)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)
