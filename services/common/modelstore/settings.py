"""Settings of the model store, read from `ROUNDHOUSE_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import field_validator
from pydantic_settings import NoDecode

from services.common.settings import CommonSettings


class StoreSettings(CommonSettings):
    """Where installed models live and where local model sources may be read from."""

    model_store: Path | None = None
    """Root of the model store (`ROUNDHOUSE_MODEL_STORE`). Unset: `<home>/models`."""

    source_roots: Annotated[list[Path], NoDecode] = []
    """Folders `path` and `gguf` sources may be read from (`ROUNDHOUSE_SOURCE_ROOTS`, separated
    by the OS path separator, `:` on Linux, or a JSON list). Relative source paths resolve
    against the first. Unset: `<home>/sources`."""

    @field_validator("source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    def resolved_model_store(self) -> Path:
        """The store root to use: the setting, else `<home>/models`."""
        return self.model_store or self.home / "models"

    def resolved_source_roots(self) -> list[Path]:
        """The source roots to use: the setting, else `[<home>/sources]`."""
        return list(self.source_roots) or [self.home / "sources"]
