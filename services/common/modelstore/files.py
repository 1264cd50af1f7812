"""File work of the model store: listing, copying or linking, hashing, recognising model folders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath

from services.common.modelstore.model import InstallError, ModelFormat, Reporter

CHUNK = 4 * 1024 * 1024
MANIFEST = "manifest.json"
SKIPPED_DIRS = frozenset({".git", ".cache", "__pycache__"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def is_skipped(relative: str) -> bool:
    """True for files that never belong to a model: VCS and cache folders, bytecode."""
    parts = PurePosixPath(relative).parts
    return any(p in SKIPPED_DIRS for p in parts[:-1]) or relative.endswith(".pyc")


def list_tree(folder: Path) -> list[str]:
    """Every model file under `folder`, as sorted relative POSIX paths.

    The store's own `manifest.json` at the top is left out. A symlinked folder is refused:
    following it could leave the allowed source roots or loop.
    """
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                raise InstallError(f"{here / name} is a symlinked folder; copy it in instead")
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            relative = (here / name).relative_to(folder).as_posix()
            if relative != MANIFEST and not is_skipped(relative):
                names.append(relative)
    return sorted(names)


def model_format(folder: Path) -> ModelFormat:
    """Tell a sentence-transformers folder (modules.json) from a transformers one (config.json).

    Raises `InstallError` when the folder is neither or holds no weights.
    """
    if (folder / "modules.json").is_file():
        fmt: ModelFormat = "sentence-transformers"
    elif (folder / "config.json").is_file():
        fmt = "transformers"
    else:
        raise InstallError(
            f"{folder} is not a model folder: it holds neither config.json nor modules.json"
        )
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in list_tree(folder)):
        raise InstallError(f"{folder} holds no weights (*.safetensors or *.bin)")
    return fmt


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root.resolve()) for root in roots)


def copy_tree(
    source: Path, target: Path, reporter: Reporter, allowed_roots: list[Path] | None = None
) -> None:
    """Copy the model files of `source` into the new folder `target`, hardlinking where possible.

    With `allowed_roots`, every file (symlinks resolved) must lie inside one of them.
    Reports stage `copy` and stops with `Cancelled` between chunks.
    """
    names = list_tree(source)
    resolved = {name: (source / name).resolve() for name in names}
    if allowed_roots is not None:
        for name, real in resolved.items():
            if not _within(real, allowed_roots):
                raise InstallError(
                    f"{source / name} leads to {real}, outside the allowed source roots"
                )
    reporter.start("copy", sum(p.stat().st_size for p in resolved.values()), str(source))
    for name in names:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        real = resolved[name]
        try:
            os.link(real, destination)
        except OSError:
            _copy_file(real, destination, reporter)
        else:
            reporter.advance(real.stat().st_size)
    reporter.finish()


def _copy_file(source: Path, destination: Path, reporter: Reporter) -> None:
    with source.open("rb") as src, destination.open("xb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            reporter.advance(len(chunk))
    shutil.copystat(source, destination)


def sha256_file(path: Path, reporter: Reporter | None = None) -> str:
    """The hex sha256 of a file, read in chunks (each chunk counted on `reporter`)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if reporter is not None:
                reporter.advance(len(chunk))
    return digest.hexdigest()


def tree_bytes(folder: Path) -> int:
    """Bytes held by the regular files under `folder`, each hardlinked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
