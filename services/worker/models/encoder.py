"""Embedding models hosted with sentence-transformers, batched across concurrent calls.

Pooling and normalisation come from the folder's `modules.json` and module configs; this
module only tokenizes, checks lengths and feeds the token ids through the model's modules.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from services.common.assetspec import AssetSpec
from services.common.errors import ContextLengthExceeded, InvalidArgument
from services.worker.models.batching import BatchSettings, DynamicBatcher
from services.worker.models.causal_lm import module_bytes
from services.worker.models.types import (
    EMBEDDING,
    Capabilities,
    EmbedInput,
    EmbedResult,
    HostedModel,
    PassCallback,
)

INLINE_TOKENIZE_INPUTS = 16


class SentenceEmbeddingModel(HostedModel):
    """A sentence-transformers model: texts or token-id arrays in, one vector each out.

    Token-id arrays are used as given (no special tokens added). Inputs longer than the
    model's maximum sequence length are rejected, as OpenAI does, never truncated.
    """

    def __init__(
        self,
        asset_id: str,
        model: SentenceTransformer,
        capabilities: Capabilities,
        batching: BatchSettings | None = None,
    ) -> None:
        self.asset_id = asset_id
        self.capabilities = capabilities
        self.interfaces = (EMBEDDING,)
        self.model = model
        self._tokenizer = model.tokenizer
        self._lower_case = bool(getattr(model[0], "do_lower_case", False))
        self._vocab = len(self._tokenizer)
        self._pad = self._tokenizer.pad_token_id or 0
        self._token_types = "token_type_ids" in getattr(self._tokenizer, "model_input_names", [])
        self._batcher = DynamicBatcher(self._forward, batching, name=f"embed-{asset_id}")

    @classmethod
    def load(cls, spec: AssetSpec, folder: Path, batching: BatchSettings | None = None) -> SentenceEmbeddingModel:
        """Load a sentence-transformers folder and measure capabilities.

        Blocking: the caller runs it in a thread.
        """
        model = SentenceTransformer(str(folder), device="cpu")
        model.eval().requires_grad_(False)
        context = model.max_seq_length or spec.metadata.context_length or 512
        capabilities = Capabilities(
            context_length=int(context),
            embedding_dim=int(model.get_embedding_dimension() or spec.metadata.embedding_dim or 0),
            parameter_count=sum(p.numel() for p in model.parameters()),
            memory_bytes=module_bytes(model),
            streaming=False,
        )
        return cls(spec.asset_id, model, capabilities, batching)

    def on_forward_pass(self, callback: PassCallback) -> None:
        """Call `callback(inputs)` after every forward pass of its batches (batch thread)."""
        self._batcher.on_pass = callback

    async def _embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        # A few inputs tokenize in microseconds: a thread hop would cost more than it saves.
        if len(inputs) <= INLINE_TOKENIZE_INPUTS:
            sequences = self._sequences(inputs)
        else:
            sequences = await asyncio.to_thread(self._sequences, inputs)
        vectors = await self._batcher.run(sequences)
        return EmbedResult(
            vectors=vectors,
            prompt_tokens=sum(len(s) for s in sequences),
            dimensions=int(vectors.shape[1]),
        )

    def _sequences(self, inputs: list[EmbedInput]) -> list[list[int]]:
        texts = [(i, s.lower() if self._lower_case else s) for i, s in enumerate(inputs) if isinstance(s, str)]
        sequences: list[list[int] | None] = [None] * len(inputs)
        if texts:
            encoded = self._tokenizer([t for _, t in texts], truncation=False)["input_ids"]
            for (i, _), ids in zip(texts, encoded, strict=True):
                sequences[i] = list(ids)
        for i, item in enumerate(inputs):
            if sequences[i] is None:
                sequences[i] = self._token_ids(i, item)
        limit = self.capabilities.context_length
        for i, seq in enumerate(sequences):
            assert seq is not None
            if len(seq) > limit:
                raise ContextLengthExceeded(
                    f"input {i} is {len(seq)} tokens long, but this model accepts at most "
                    f"{limit} tokens per input; shorten it"
                )
        return sequences  # type: ignore[return-value]

    def _token_ids(self, index: int, item: Any) -> list[int]:
        if not isinstance(item, Sequence | np.ndarray) or isinstance(item, str | bytes):
            raise InvalidArgument(f"input {index} must be a string or an array of token ids")
        ids = [int(t) for t in item]
        if not ids:
            raise InvalidArgument(f"input {index} is an empty token array")
        if min(ids) < 0 or max(ids) >= self._vocab:
            raise InvalidArgument(f"input {index} has token ids outside 0..{self._vocab - 1}")
        return ids

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[row, : len(seq)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention}
        if self._token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            out = self.model.forward(features)["sentence_embedding"]
        return out.float().numpy()

    async def close(self) -> None:
        """Stop batching and drop the weights."""
        await self._batcher.close()
        del self.model
        gc.collect()
