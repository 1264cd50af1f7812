"""Benchmark figures on disk, so that a later run can be compared with this one.

`record(name, figures)` writes `bench/results/<name>-<UTC timestamp>.json`: the machine
(platform, processor), its cores, the commit (and whether the tree had uncommitted changes),
the Python and torch versions, and the figures as the benchmark gives them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _processor() -> str:
    """The CPU's name: `platform.processor()`, which is often empty on Linux, else /proc/cpuinfo."""
    if platform.processor():
        return platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where and on what the figures were measured."""
    head = _git("rev-parse", "HEAD")
    # Tracked files only: the results folder itself need not be committed to count as clean.
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {"platform": platform.platform(), "processor": _processor()},
        "cores": os.cpu_count(),
        "commit": {"sha": head.strip() if head else None,
                   "dirty": bool(changes.strip()) if changes is not None else None},
        "python": platform.python_version(),
        "torch": _version("torch"),
    }


def _rounded(value: Any) -> Any:
    """`value` with every float in it to 4 decimals: small files, no false precision."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def record(name: str, figures: dict[str, Any]) -> Path:
    """Write one run's figures, with the environment, to `bench/results/`; the file written.

    Floats are kept to 4 decimals; units belong in the figures' names (`_ms`, `_s`).
    """
    now = datetime.now(UTC)
    document = {"benchmark": name, "measured_at": now.isoformat(timespec="seconds"),
                **environment(), "figures": _rounded(figures)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nrecorded in {path.relative_to(ROOT)}")
    return path


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies in ms."""
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": statistics.mean(values)}
