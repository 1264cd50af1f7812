"""The manifest each installed model folder carries: what was installed, from what, and hashes.

A folder belongs to a source, not to an asset: every asset with that source uses it. The
manifest names the asset it was first installed for, for people reading it, and nothing more.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.assetspec_source import Source
from services.common.modelstore.files import MANIFEST, list_tree, sha256_file
from services.common.modelstore.model import (
    InstalledFile,
    InstalledModel,
    Mismatch,
    ModelFormat,
    Reporter,
)

# Bump when the store lays models out differently, so older installs count as stale.
# 2: folders keyed by source fingerprint (`sources/<fingerprint>/`), shared by assets.
LAYOUT_VERSION = 2


def source_fingerprint(source: Source) -> str:
    """A stable hash of the source spec: the store's key for the source's folder.

    Assets with equal sources share one fingerprint, hence one install; a changed source
    gets another one, so its old install no longer counts.
    """
    document = {"layout": LAYOUT_VERSION, "source": source.model_dump(mode="json")}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The contents of `manifest.json`.

    `installed_for` is the asset whose install fetched the files; informational only.
    """

    installed_for: str
    source: dict[str, Any]
    fingerprint: str
    format: ModelFormat
    files: tuple[InstalledFile, ...]
    installed_at: str
    origin: dict[str, str] = field(default_factory=dict)

    def installed(self, folder: Path, asset_id: str) -> InstalledModel:
        """The installed model this manifest describes, in `folder`, as asset `asset_id` sees it."""
        return InstalledModel(asset_id, folder, self.format, self.files)

    def write(self, folder: Path) -> None:
        """Write `manifest.json` into `folder`."""
        document = {
            "installed_for": self.installed_for,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "format": self.format,
            "origin": self.origin,
            "installed_at": self.installed_at,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        (folder / MANIFEST).write_text(json.dumps(document, indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest of `folder`, or None when there is none or it cannot be read."""
        try:
            document = json.loads((folder / MANIFEST).read_text())
            return cls(
                installed_for=document.get("installed_for", ""),
                source=document["source"],
                fingerprint=document["fingerprint"],
                format=document["format"],
                files=tuple(
                    InstalledFile(f["path"], int(f["size"]), f["sha256"]) for f in document["files"]
                ),
                installed_at=document["installed_at"],
                origin=document.get("origin", {}),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def hash_tree(folder: Path, reporter: Reporter) -> tuple[InstalledFile, ...]:
    """Size and sha256 of every model file under `folder` (stage `hash`)."""
    names = list_tree(folder)
    sizes = {name: (folder / name).stat().st_size for name in names}
    reporter.start("hash", sum(sizes.values()))
    files = tuple(
        InstalledFile(name, sizes[name], sha256_file(folder / name, reporter)) for name in names
    )
    reporter.finish()
    return files


def new_manifest(
    installed_for: str,
    source: Source,
    fmt: ModelFormat,
    files: tuple[InstalledFile, ...],
    origin: dict[str, str],
) -> Manifest:
    """A manifest stamped with the current time."""
    return Manifest(
        installed_for=installed_for,
        source=source.model_dump(mode="json"),
        fingerprint=source_fingerprint(source),
        format=fmt,
        files=files,
        installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        origin=origin,
    )


def check_files(folder: Path, manifest: Manifest, reporter: Reporter) -> list[Mismatch]:
    """Re-hash `folder` against `manifest` (stage `verify`); every difference is one mismatch."""
    present = set(list_tree(folder))
    problems = [
        Mismatch(name, "not in the manifest")
        for name in sorted(present - {f.path for f in manifest.files})
    ]
    reporter.start("verify", sum(f.size for f in manifest.files if f.path in present))
    for recorded in manifest.files:
        path = folder / recorded.path
        if recorded.path not in present:
            problems.append(Mismatch(recorded.path, "missing"))
        elif path.stat().st_size != recorded.size:
            problems.append(Mismatch(recorded.path, "size differs from the manifest"))
            reporter.advance(recorded.size)
        elif sha256_file(path, reporter) != recorded.sha256:
            problems.append(Mismatch(recorded.path, "sha256 differs from the manifest"))
    reporter.finish()
    return problems


def sizes_match(folder: Path, manifest: Manifest) -> bool:
    """A cheap check (no hashing) that every recorded file is there with its recorded size."""
    try:
        return all((folder / f.path).stat().st_size == f.size for f in manifest.files)
    except OSError:
        return False
