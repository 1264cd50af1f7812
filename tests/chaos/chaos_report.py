"""The table the suite prints at the end: per fault, what the clients saw and how long the
stack took to serve again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One fault's line."""

    fault: str
    ok: int
    failed: int
    max_latency_s: float
    recovery_s: float | None
    """From the fault striking to the stack serving again; None when it did not within the bound."""
    violations: int
    failures: dict[str, int] = field(default_factory=dict)
    """How the failed requests failed: count by label (`HTTP 503 model_not_ready`...)."""


ROWS: list[Row] = []
"""Filled by the fault tests in the order they ran."""

HEADER = ("fault", "requests ok", "failed", "max latency (s)", "recovery (s)", "violations")


def table(rows: list[Row]) -> list[str]:
    """The rows as aligned text lines, a header first."""
    cells = [HEADER] + [
        (r.fault, str(r.ok), str(r.failed), f"{r.max_latency_s:.2f}",
         "not back" if r.recovery_s is None else f"{r.recovery_s:.1f}", str(r.violations))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
            for line in cells]


def failure_lines(rows: list[Row]) -> list[str]:
    """Per fault with failed requests, how they failed."""
    return [f"{r.fault}: " + ", ".join(f"{label} x{n}" for label, n in sorted(r.failures.items()))
            for r in rows if r.failures]
