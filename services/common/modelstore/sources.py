"""Make an asset's source local: a model folder or a GGUF file the store can take in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.common.assetspec_source import Source
from services.common.modelstore.files import is_skipped
from services.common.modelstore.model import InstallError


@dataclass(frozen=True)
class Fetched:
    """A source made local.

    `path` is a model folder or, with `is_gguf`, a GGUF file. `owned` means it lies in the
    install's work dir and may be moved into place instead of copied. `allowed_roots` bounds
    where a folder's files (symlinks resolved) may live. `expected` holds sha256 hex digests
    the source vouches for (a wheel's RECORD), keyed by path relative to the folder, or by the
    GGUF file's name.
    """

    path: Path
    is_gguf: bool
    owned: bool = False
    allowed_roots: list[Path] | None = None
    origin: dict[str, str] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)


def resolve_source_path(value: str, roots: list[Path]) -> Path:
    """Resolve a `path`/`gguf` source: relative to the first root, and inside some root.

    The spec validator already refuses `..` and absolute paths outside the roots; this check
    repeats it on the resolved path, so a symlink cannot lead out of the roots either.
    """
    if not roots:
        raise InstallError("no source roots are configured; set ROUNDHOUSE_SOURCE_ROOTS")
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise InstallError(
            f"source path {value} resolves to {resolved}, outside the allowed source roots "
            f"({allowed}); set ROUNDHOUSE_SOURCE_ROOTS to allow it"
        )
    if not resolved.exists():
        raise InstallError(f"source path {resolved} does not exist")
    return resolved


def fetch_local(source: Source, roots: list[Path]) -> Fetched:
    """A `path` source (a model folder, or a .gguf file) or a `gguf` source."""
    path = resolve_source_path(source.path, roots)
    origin = {"path": str(path)}
    if path.is_file() and path.suffix == ".gguf":
        return Fetched(path, is_gguf=True, origin=origin)
    if source.kind == "gguf" or not path.is_dir():
        raise InstallError(f"source path {path} is neither a model folder nor a .gguf file")
    return Fetched(path, is_gguf=False, allowed_roots=roots, origin=origin)


@dataclass(frozen=True)
class Choice:
    """What in a package (or repository) holds the model: one .gguf file or one folder."""

    relative: str
    is_gguf: bool


def choose_model(names: list[str], wanted: str, where: str) -> Choice:
    """Pick the model among a package's files (relative POSIX paths).

    `wanted` (the source's `file`) names a .gguf file or a model folder, by its path or by
    its trailing part; without it the package must hold exactly one .gguf file, or else
    exactly one model folder (one holding modules.json or config.json, nested ones not
    counted: a sentence-transformers folder has config.json files in its sub-folders).
    """
    names = [n for n in names if not is_skipped(n) and ".dist-info/" not in n]
    ggufs = [n for n in names if n.endswith(".gguf")]
    folders = _model_folders(names)
    if wanted:
        if wanted.endswith(".gguf"):
            matches = [Choice(n, True) for n in ggufs if _names(n, wanted)]
        else:
            matches = [Choice(d, False) for d in folders if _names(d, wanted)]
    elif len(ggufs) == 1:
        matches = [Choice(ggufs[0], True)]
    elif ggufs:
        matches = [Choice(n, True) for n in ggufs]
    else:
        matches = [Choice(d, False) for d in folders]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        if wanted:
            raise InstallError(f"{where} holds no '{wanted}'")
        raise InstallError(
            f"{where} holds no .gguf file and no model folder (config.json or modules.json)"
        )
    listed = ", ".join(m.relative or "." for m in matches)
    raise InstallError(f"{where} holds several models ({listed}); name one with source.file")


def _names(path: str, wanted: str) -> bool:
    return path == wanted or path.endswith("/" + wanted.strip("/"))


def _model_folders(names: list[str]) -> list[str]:
    def parent(name: str) -> str:
        folder = str(PurePosixPath(name).parent)
        return "" if folder == "." else folder

    def inside(folder: str, other: str) -> bool:
        return other == "" or folder == other or folder.startswith(other + "/")

    sentence = {parent(n) for n in names if PurePosixPath(n).name == "modules.json"}
    plain = {parent(n) for n in names if PurePosixPath(n).name == "config.json"}
    plain = {d for d in plain if not any(inside(d, s) for s in sentence)}
    candidates = sentence | plain
    outermost = [d for d in candidates if not any(inside(d, o) for o in candidates if o != d)]
    return sorted(outermost)
