"""The model store: installs are complete or absent, hashed, idempotent, and stay in bounds."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf
from tiny_models import build_tiny_llama, build_tiny_sentence_model

from services.common.assetspec import AssetSpec, parse_spec
from services.common.assetspec_source import Source
from services.common.errors import Cancelled, InvalidArgument
from services.common.modelstore import ModelStore, Progress


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source root: `tiny-llama/`, `tiny-minilm/` (sentence-transformers), `gguf/tiny.gguf`."""
    root = tmp_path_factory.mktemp("sources")
    build_tiny_llama(root / "tiny-llama")
    build_tiny_sentence_model(root / "tiny-minilm")
    write_tiny_gguf(root / "gguf" / "tiny.gguf")
    return root


@pytest.fixture
def store(tmp_path: Path, sources: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", [sources])


def spec(source: dict, asset_id: str = "tiny", roots: list[Path] | None = None) -> AssetSpec:
    return parse_spec(
        {"asset_id": asset_id, "interface": "llm-runtime", "source": source}, source_roots=roots
    )


TINY_LLAMA = Source(kind="path", path="tiny-llama")


def leftovers(store: ModelStore) -> list[str]:
    """What the store root holds besides its lock folder."""
    return sorted(p.name for p in store.root.iterdir() if p.name != ".locks")


def installed_sources(store: ModelStore) -> list[str]:
    """The source folders (fingerprints) the store holds."""
    folder = store.root / "sources"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_path_install_copies_hashes_and_loads(store: ModelStore, sources: Path) -> None:
    seen: list[Progress] = []
    model = store.install(spec({"kind": "path", "path": "tiny-llama"}), seen.append)

    assert model.path == store.folder_for(TINY_LLAMA) and model.format == "transformers"
    assert model.asset_id == "tiny"
    manifest = json.loads((model.path / "manifest.json").read_text())
    assert manifest["installed_for"] == "tiny" and manifest["source"]["path"] == "tiny-llama"
    assert manifest["installed_at"] and manifest["fingerprint"]
    recorded = {f["path"]: f for f in manifest["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(recorded)
    for name, entry in recorded.items():
        data = (sources / "tiny-llama" / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert model.total_bytes == sum(f["size"] for f in manifest["files"])
    assert [p.stage for p in seen if p.percent == 100] == ["copy", "hash"]
    assert all(0 <= p.percent <= 100 and p.bytes_done <= p.bytes_total for p in seen)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(model.path)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    logits = loaded(**tokenizer("hello hi", return_tensors="pt")).logits
    assert logits.shape[-1] == loaded.config.vocab_size
    assert store.verify(TINY_LLAMA) == []
    assert leftovers(store) == ["sources"] and installed_sources(store) == [model.path.name]


def test_sentence_transformers_folder_keeps_its_modules(store: ModelStore) -> None:
    asset = spec({"kind": "path", "path": "tiny-minilm"}, asset_id="tiny-minilm")
    model = store.install(asset)

    assert model.format == "sentence-transformers"
    assert {"modules.json", "1_Pooling/config.json"} <= {f.path for f in model.files}
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(model.path), device="cpu")
    assert encoder.encode(["hello hi"]).shape == (1, 32)


def test_second_install_is_a_noop(store: ModelStore) -> None:
    asset = spec({"kind": "path", "path": "tiny-llama"})
    first = store.install(asset)
    manifest = store.folder_for(TINY_LLAMA) / "manifest.json"
    manifest_before = manifest.read_text()
    seen: list[Progress] = []

    second = store.install(asset, seen.append)

    assert second == first and seen == []
    assert manifest.read_text() == manifest_before


def test_changed_source_means_not_installed(store: ModelStore, sources: Path) -> None:
    store.install(spec({"kind": "path", "path": "tiny-llama"}))
    moved = spec({"kind": "path", "path": str(sources / "tiny-llama")}, roots=[sources])

    assert not store.is_installed(moved)
    store.install(moved)
    assert store.is_installed(moved)
    manifest = json.loads((store.folder_for(moved.source) / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(sources / "tiny-llama")
    assert installed_sources(store) == sorted(
        store.folder_for(s).name for s in (TINY_LLAMA, moved.source))


@pytest.mark.parametrize(
    ("source", "stage"),
    [
        ({"kind": "path", "path": "tiny-llama"}, "copy"),
        ({"kind": "path", "path": "tiny-llama"}, "hash"),
        ({"kind": "gguf", "path": "gguf/tiny.gguf"}, "convert"),
    ],
)
def test_cancel_mid_install_leaves_nothing(store: ModelStore, source: dict, stage: str) -> None:
    cancel = threading.Event()

    def cancel_when_busy(progress: Progress) -> None:
        # For conversion, wait until the child process reports work under way.
        if progress.stage == stage and (stage != "convert" or progress.percent > 0):
            cancel.set()

    with pytest.raises(Cancelled):
        store.install(spec(source), cancel_when_busy, cancel)

    assert cancel.is_set()
    assert not store.folder_for(spec(source).source).exists()
    assert leftovers(store) == []
    assert store.install(spec(source)).path == store.folder_for(spec(source).source)


def test_gguf_is_converted_once_to_safetensors(store: ModelStore) -> None:
    asset = spec({"kind": "gguf", "path": "gguf/tiny.gguf"})
    seen: list[Progress] = []
    model = store.install(asset, seen.append)

    assert model.path == store.folder_for(asset.source)
    names = {f.path for f in model.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    assert "convert" in {p.stage for p in seen}
    config = json.loads((model.path / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(model.path)
    assert loaded.config.num_hidden_layers == 2
    again: list[Progress] = []
    assert store.install(asset, again.append) == model and again == []


def test_assets_with_the_same_source_share_one_install(store: ModelStore) -> None:
    first = store.install(spec({"kind": "path", "path": "tiny-llama"}, asset_id="tiny"))
    manifest_before = (store.folder_for(TINY_LLAMA) / "manifest.json").read_text()
    copy = spec({"kind": "path", "path": "tiny-llama"}, asset_id="tiny-copy")
    assert store.is_installed(copy)
    seen: list[Progress] = []

    second = store.install(copy, seen.append)

    assert seen == []
    assert second.path == first.path and second.files == first.files
    assert second.asset_id == "tiny-copy"
    assert installed_sources(store) == [store.folder_for(TINY_LLAMA).name]
    assert (store.folder_for(TINY_LLAMA) / "manifest.json").read_text() == manifest_before


def test_a_different_source_is_installed_apart(store: ModelStore) -> None:
    llama = store.install(spec({"kind": "path", "path": "tiny-llama"}, asset_id="llama"))
    other = spec({"kind": "path", "path": "tiny-minilm"}, asset_id="llama-too")
    assert not store.is_installed(other)

    minilm = store.install(other)

    assert minilm.path != llama.path and minilm.format == "sentence-transformers"
    assert len(installed_sources(store)) == 2


def test_removing_a_shared_source_removes_it_for_every_asset(store: ModelStore) -> None:
    one = spec({"kind": "path", "path": "tiny-llama"}, asset_id="one")
    two = spec({"kind": "path", "path": "tiny-llama"}, asset_id="two")
    kept = spec({"kind": "path", "path": "tiny-minilm"}, asset_id="kept")
    for asset in (one, two, kept):
        store.install(asset)

    assert store.remove(one.source) is True

    assert not store.is_installed(one) and not store.is_installed(two)
    assert store.is_installed(kept)
    assert installed_sources(store) == [store.folder_for(kept.source).name]
    assert store.install(two).path == store.folder_for(TINY_LLAMA)


def test_older_layout_counts_as_not_installed(store: ModelStore, sources: Path) -> None:
    old = store.root / "tiny"
    shutil.copytree(sources / "tiny-llama", old)
    (old / "manifest.json").write_text(json.dumps({"asset_id": "tiny", "fingerprint": "v1"}))
    asset = spec({"kind": "path", "path": "tiny-llama"})

    assert not store.is_installed(asset)
    assert store.install(asset).path == store.folder_for(TINY_LLAMA)


def test_remote_sources_have_no_folder(store: ModelStore) -> None:
    remote = Source(kind="url", url="http://127.0.0.1:9/v1")
    assert store.remove(remote) is False
    with pytest.raises(InvalidArgument, match="no folder"):
        store.folder_for(remote)


def test_verify_reports_changed_missing_and_extra_files(store: ModelStore) -> None:
    folder = store.install(spec({"kind": "path", "path": "tiny-llama"})).path
    assert folder is not None
    # Replace files rather than edit them: the store hardlinks the source's files.
    config = folder / "config.json"
    text = config.read_text()
    config.unlink()
    config.write_text(text.replace('"hidden_size": 32', '"hidden_size": 33'))
    (folder / "tokenizer.json").unlink()
    (folder / "notes.txt").write_text("extra")

    problems = {p.path: p.reason for p in store.verify(TINY_LLAMA)}

    assert problems == {
        "config.json": "sha256 differs from the manifest",
        "tokenizer.json": "missing",
        "notes.txt": "not in the manifest",
    }
    assert not store.is_installed(spec({"kind": "path", "path": "tiny-llama"}))


def test_remove_frees_the_space(store: ModelStore) -> None:
    assert store.usage_bytes() == 0
    model = store.install(spec({"kind": "path", "path": "tiny-llama"}))
    assert store.usage_bytes() >= model.total_bytes > 0

    assert store.remove(TINY_LLAMA) is True
    assert not store.folder_for(TINY_LLAMA).exists() and store.usage_bytes() == 0
    assert not store.is_installed(spec({"kind": "path", "path": "tiny-llama"}))
    assert store.remove(TINY_LLAMA) is False


def test_concurrent_installs_build_once(store: ModelStore) -> None:
    asset = spec({"kind": "path", "path": "tiny-llama"})
    seen: list[Progress] = []
    start = threading.Barrier(2)
    results = []

    def install() -> None:
        start.wait()
        results.append(store.install(asset, seen.append))

    threads = [threading.Thread(target=install) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 2 and results[0] == results[1]
    builds = [p for p in seen if p.stage == "copy" and p.percent == 0]
    assert len(builds) == 1
    assert installed_sources(store) == [store.folder_for(TINY_LLAMA).name]
