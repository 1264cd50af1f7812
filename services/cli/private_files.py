"""Files only their owner may read: the admin key, the recorded URLs and internal token."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, value: str) -> None:
    """Write `value` and a newline to `path`, mode 0600 (its folder made if missing).

    The file is 0600 from the moment it exists, and an existing file of a looser mode is
    tightened before the value is written: never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
