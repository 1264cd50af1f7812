"""The worker's embedding models on a tiny sentence-transformers folder: vectors, checks, and
concurrent calls sharing forward passes (the batcher alone: `test_batching.py`)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from tiny_models import build_tiny_sentence_model, spec_for

from services.common.errors import ContextLengthExceeded, InvalidArgument, WrongInterface
from services.worker.models import BatchSettings, ChatParams, load_model
from services.worker.models.encoder import SentenceEmbeddingModel


@pytest.fixture(scope="session")
async def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> SentenceEmbeddingModel:
    folder = build_tiny_sentence_model(tmp_path_factory.mktemp("emb") / "tiny-encoder")
    spec = spec_for("tiny-encoder", "embedding-runtime", folder)
    settings = BatchSettings(max_batch_tokens=8192, max_batch_items=64)
    model = await asyncio.to_thread(load_model, spec, folder, embed_batching=settings)
    yield model
    await model.close()


class ForwardCounter:
    """Counts forward passes through a module with a real forward hook."""

    def __init__(self, model: SentenceEmbeddingModel) -> None:
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()
        self._handle = model.model[0].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        with self._lock:
            self.calls += 1
            self.batch_sizes.append(int(output["input_ids"].shape[0]))

    def remove(self) -> None:
        self._handle.remove()


async def test_capabilities_are_detected(tiny_encoder: SentenceEmbeddingModel) -> None:
    caps = tiny_encoder.capabilities
    assert caps.embedding_dim == 32
    assert caps.context_length == 32
    assert caps.parameter_count == sum(p.numel() for p in tiny_encoder.model.parameters())
    assert caps.memory_bytes >= caps.parameter_count * 4
    assert tiny_encoder.interfaces == ("embedding-runtime",)


async def test_vectors_match_the_folder_pipeline(tiny_encoder: SentenceEmbeddingModel) -> None:
    texts = ["hello w1", "w2 w3 w4 w5 w6 w7", "hi"]
    result = await tiny_encoder.embed(texts)
    reference = tiny_encoder.model.encode(texts)
    assert result.dimensions == 32 and result.vectors.shape == (3, 32)
    np.testing.assert_allclose(result.vectors, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.prompt_tokens == (2 + 2) + (6 + 2) + (1 + 2)  # words plus [CLS] and [SEP]


async def test_token_arrays_embed_like_their_text(tiny_encoder: SentenceEmbeddingModel) -> None:
    ids = tiny_encoder.model.tokenizer("hello w1")["input_ids"]
    result = await tiny_encoder.embed(["hello w1", ids, np.array(ids)])
    np.testing.assert_allclose(result.vectors[1], result.vectors[0], atol=1e-5)
    np.testing.assert_allclose(result.vectors[2], result.vectors[0], atol=1e-5)
    assert result.prompt_tokens == 3 * len(ids)


async def test_over_long_and_bad_inputs_are_rejected(tiny_encoder: SentenceEmbeddingModel) -> None:
    with pytest.raises(ContextLengthExceeded, match="input 1 is 42 tokens"):
        await tiny_encoder.embed(["w1", " ".join(["w2"] * 40)])
    with pytest.raises(ContextLengthExceeded):
        await tiny_encoder.embed([[5] * 33])
    with pytest.raises(InvalidArgument, match="token ids outside"):
        await tiny_encoder.embed([[5, 10_000]])
    with pytest.raises(InvalidArgument):
        await tiny_encoder.embed([])
    with pytest.raises(WrongInterface):
        tiny_encoder.chat(ChatParams(prompt="w1"))


async def test_concurrent_calls_share_forward_passes(tiny_encoder: SentenceEmbeddingModel) -> None:
    texts = [" ".join(f"w{j}" for j in range(i % 7 + 1)) for i in range(24)]
    alone = [(await tiny_encoder.embed([t])).vectors[0] for t in texts]
    counter = ForwardCounter(tiny_encoder)
    try:
        results = await asyncio.gather(*(tiny_encoder.embed([t]) for t in texts))
    finally:
        counter.remove()
    assert counter.calls < len(texts)
    assert max(counter.batch_sizes) > 1
    for single, batched in zip(alone, results, strict=True):
        np.testing.assert_allclose(batched.vectors[0], single, atol=1e-5)
