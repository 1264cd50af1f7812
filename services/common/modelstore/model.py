"""What the model store hands out: installed models, progress reports, install errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.errors import Cancelled, RoundhouseError

ModelFormat = Literal["transformers", "sentence-transformers", "remote"]
Stage = Literal["download", "unpack", "copy", "convert", "hash", "verify"]


class InstallError(RoundhouseError):
    """An asset's source could not be turned into an installed model; nothing was installed."""


@dataclass(frozen=True)
class Progress:
    """One progress report of an install or a verify.

    `percent` is the progress of the current `stage` (0-100); `bytes_done` and `bytes_total`
    count the bytes that stage handles (both 0 where the stage cannot count bytes).
    """

    stage: Stage
    percent: float
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class InstalledFile:
    """One file of an installed model, as recorded in its manifest."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class InstalledModel:
    """A model ready to load from the store.

    `path` is the folder to hand to `from_pretrained` / `SentenceTransformer`; it is None for
    remote (`url`) assets, which have nothing stored.
    """

    asset_id: str
    path: Path | None
    format: ModelFormat
    files: tuple[InstalledFile, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Bytes the model's files take (the manifest itself not counted)."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Mismatch:
    """A file of an installed model that no longer matches its manifest."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Reporter:
    """Reports the progress of one install or verify and honours its cancel event.

    Long loops call `advance` per chunk: it raises `Cancelled` as soon as the event is set,
    and reports only when the percentage moves by a whole point, so callers are not flooded.
    """

    def __init__(self, callback: ProgressCallback | None, cancel: threading.Event | None) -> None:
        self._callback = callback
        self._cancel = cancel
        self._stage: Stage = "download"
        self._done = 0
        self._total = 0
        self._last_percent = -1.0

    def check(self) -> None:
        """Raise `Cancelled` when the caller asked to cancel."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("install cancelled")

    def start(self, stage: Stage, total: int = 0, message: str = "") -> None:
        """Begin a stage that handles `total` bytes (0 where unknown)."""
        self.check()
        self._stage, self._done, self._total = stage, 0, total
        self._last_percent = -1.0
        self._emit(0.0, message)

    def advance(self, nbytes: int) -> None:
        """Count `nbytes` more done in the current stage."""
        self._done += nbytes
        self.check()
        if self._total > 0:
            percent = float(min(100, int(self._done * 100 / self._total)))
            if percent > self._last_percent:
                self._emit(percent, "")

    def percent(self, percent: float, message: str = "") -> None:
        """Report a stage that counts steps rather than bytes."""
        self.check()
        self._emit(percent, message)

    def finish(self, message: str = "", total: int | None = None) -> None:
        """End the current stage at 100%; `total` gives its bytes where only known at the end."""
        if total is not None:
            self._total = total
        self._done = max(self._done, self._total)
        if self._last_percent < 100 or message:
            self._emit(100.0, message)
        self.check()

    def _emit(self, percent: float, message: str) -> None:
        self._last_percent = percent
        if self._callback is not None:
            self._callback(Progress(self._stage, percent, self._done, self._total, message))
