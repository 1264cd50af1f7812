"""The worker's embedding models and dynamic batching, on a tiny sentence-transformers folder."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from polling import wait_until
from tiny_models import build_tiny_sentence_model, spec_for

from services.common.errors import ContextLengthExceeded, InvalidArgument, WrongInterface
from services.worker.models import BatchSettings, ChatParams, load_model
from services.worker.models.batching import DynamicBatcher, plan_passes
from services.worker.models.encoder import SentenceEmbeddingModel


@pytest.fixture(scope="session")
async def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> SentenceEmbeddingModel:
    folder = build_tiny_sentence_model(tmp_path_factory.mktemp("emb") / "tiny-encoder")
    spec = spec_for("tiny-encoder", "embedding-runtime", folder)
    settings = BatchSettings(max_wait_s=0.05, max_batch_tokens=8192, max_batch_items=64)
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


async def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    gate, started = threading.Event(), threading.Event()

    def forward(batch: list[list[int]]) -> np.ndarray:
        started.set()
        gate.wait(10)
        return np.array([[float(s[0])] for s in batch])

    batcher = DynamicBatcher(forward, BatchSettings(max_wait_s=0.001))
    try:
        in_flight = asyncio.create_task(batcher.run([[100]]))
        assert await asyncio.to_thread(started.wait, 10)
        waiting = [asyncio.create_task(batcher.run([[i]])) for i in range(5)]
        await wait_until(lambda: batcher.queued == 5)
        in_flight.cancel()
        waiting[1].cancel()
        gate.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [r.tolist() for i, r in enumerate(results) if i != 1] == [
            [[0.0]],
            [[2.0]],
            [[3.0]],
            [[4.0]],
        ]
        assert (await batcher.run([[7]])).tolist() == [[7.0]]
    finally:
        gate.set()
        await batcher.close()


def test_passes_sort_by_length_and_respect_bounds() -> None:
    settings = BatchSettings(max_batch_tokens=12, max_batch_items=3)
    passes = plan_passes([5, 1, 3, 2, 4, 1], settings)
    assert [i for p in passes for i in p] == [1, 5, 3, 2, 4, 0]
    lengths = [5, 1, 3, 2, 4, 1]
    for p in passes:
        assert len(p) <= 3
        assert max(lengths[i] for i in p) * len(p) <= 12 or len(p) == 1


async def test_batcher_runs_one_pass_at_a_time_on_one_thread() -> None:
    threads: set[str] = set()
    running = 0
    overlap = False
    lock = threading.Lock()

    def forward(batch: list[list[int]]) -> np.ndarray:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap |= running > 1
            threads.add(threading.current_thread().name)
        rows = np.array([[float(sum(s)), float(len(s))] for s in batch])
        with lock:
            running -= 1
        return rows

    batcher = DynamicBatcher(forward, BatchSettings(max_wait_s=0.001, max_batch_items=4))
    try:
        results = await asyncio.gather(*(batcher.run([[i, i], [1]]) for i in range(20)))
    finally:
        await batcher.close()
    for i, rows in enumerate(results):
        assert rows.tolist() == [[2.0 * i, 2.0], [1.0, 1.0]]
    assert len(threads) == 1 and not overlap
    with pytest.raises(RuntimeError):
        await batcher.run([[1]])
