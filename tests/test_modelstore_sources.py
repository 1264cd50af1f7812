"""Where the model store may read sources from, and what it says when it cannot."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama

from services.common.assetspec import AssetSpec, parse_spec
from services.common.errors import InvalidSpec
from services.common.modelstore import InstallError, ModelStore, StoreSettings
from services.common.modelstore.sources import Choice, choose_model


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    root = tmp_path / "sources"
    root.mkdir()
    return root


@pytest.fixture
def store(tmp_path: Path, sources: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", [sources])


def spec(source: dict, roots: list[Path] | None = None) -> AssetSpec:
    return parse_spec(
        {"asset_id": "tiny", "interface": "llm-runtime", "source": source}, source_roots=roots
    )


def leftovers(store: ModelStore) -> list[str]:
    """What the store root holds besides its lock folder (nothing when it was never made)."""
    if not store.root.exists():
        return []
    return sorted(p.name for p in store.root.iterdir() if p.name != ".locks")


def test_paths_outside_the_source_roots_are_refused(
    store: ModelStore, sources: Path, tmp_path: Path
) -> None:
    outside = build_tiny_llama(tmp_path / "outside")
    with pytest.raises(InvalidSpec, match="must not contain '..'"):
        spec({"kind": "path", "path": "../outside"})
    with pytest.raises(InvalidSpec, match="outside the allowed source roots"):
        spec({"kind": "path", "path": str(outside)}, roots=[sources])

    # A spec validated against wider roots than the store's, and a symlink leading out.
    with pytest.raises(InstallError, match="outside the allowed source roots"):
        store.install(spec({"kind": "path", "path": str(outside)}, roots=[tmp_path]))
    link = sources / "escape"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(InstallError, match="outside the allowed source roots"):
            store.install(spec({"kind": "path", "path": "escape"}))
    finally:
        link.unlink()
    assert leftovers(store) == []


def test_folder_without_weights_is_refused(store: ModelStore, sources: Path) -> None:
    empty = sources / "config-only"
    empty.mkdir()
    (empty / "config.json").write_text("{}")

    with pytest.raises(InstallError, match="holds no weights"):
        store.install(spec({"kind": "path", "path": "config-only"}))
    assert leftovers(store) == []


def test_hf_offline_fails_fast_and_clearly(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(InstallError) as failure:
        store.install(spec({"kind": "hf", "repo": "org/name"}))
    assert time.monotonic() - started < 2
    assert "cannot reach the Hugging Face hub to fetch org/name" in failure.value.message
    assert "installed from a local source" in failure.value.message


def test_hf_unreachable_hub_fails_fast(
    tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        store = ModelStore(tmp_path / "store", [sources], hub_timeout_s=2, hub_endpoint=endpoint)
        started = time.monotonic()
        with pytest.raises(InstallError, match="cannot reach the Hugging Face hub to fetch org/n"):
            store.install(spec({"kind": "hf", "repo": "org/name", "revision": "main"}))
    assert time.monotonic() - started < 10
    assert leftovers(store) == []


def test_url_source_needs_no_install(store: ModelStore) -> None:
    remote = parse_spec(
        {
            "asset_id": "remote",
            "interface": "llm-runtime",
            "runtime": "openai",
            "source": {"kind": "url", "url": "http://127.0.0.1:9/v1"},
        }
    )
    assert store.is_installed(remote)
    model = store.install(remote)
    assert model.path is None and model.format == "remote" and model.total_bytes == 0


def test_store_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROUNDHOUSE_HOME", str(tmp_path))
    monkeypatch.delenv("ROUNDHOUSE_MODEL_STORE", raising=False)
    monkeypatch.delenv("ROUNDHOUSE_SOURCE_ROOTS", raising=False)
    defaults = StoreSettings()
    assert defaults.resolved_model_store() == tmp_path / "models"
    assert defaults.resolved_source_roots() == [tmp_path / "sources"]

    monkeypatch.setenv("ROUNDHOUSE_MODEL_STORE", "/srv/models")
    monkeypatch.setenv("ROUNDHOUSE_SOURCE_ROOTS", "/srv/a:/srv/b")
    settings = StoreSettings()
    assert ModelStore.from_settings(settings).root == Path("/srv/models")
    assert settings.resolved_source_roots() == [Path("/srv/a"), Path("/srv/b")]


def test_choose_model_finds_the_model_a_package_carries() -> None:
    minilm = ["pkg/__init__.py", "pkg/model/config.json", "pkg/model/modules.json"]
    minilm += ["pkg/model/1_Pooling/config.json", "pkg-0.1.dist-info/RECORD"]
    assert choose_model(minilm, "", "pkg") == Choice("pkg/model", is_gguf=False)
    smol = ["llm/__init__.py", "llm/SmolLM2.Q4_1.gguf"]
    assert choose_model(smol, "SmolLM2.Q4_1.gguf", "llm") == Choice(smol[1], is_gguf=True)
    assert choose_model(smol, "", "llm") == Choice(smol[1], is_gguf=True)
    with pytest.raises(InstallError, match="several models"):
        choose_model(["a/x.gguf", "b/y.gguf"], "", "two")
    with pytest.raises(InstallError, match="holds no .gguf file and no model folder"):
        choose_model(["six.py"], "", "six")
