"""The chaos suite's table, printed at the end of the run whatever the verdicts."""

from __future__ import annotations

import pytest
from chaos_report import ROWS, failure_lines, table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the table of every fault injected in this run."""
    if not ROWS:
        return
    terminalreporter.write_sep("=", "chaos: requests and recovery per fault")
    for line in table(ROWS):
        terminalreporter.write_line(line)
    terminalreporter.write_line("failed requests, by what they got:")
    for line in failure_lines(ROWS):
        terminalreporter.write_line(f"  {line}")
