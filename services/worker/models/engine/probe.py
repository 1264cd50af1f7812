"""Whether the chat engine can serve a model: one short prefill and one batched decode step of
two rows, as the engine will run them (see `probe_model`)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers import DynamicCache

from services.worker.models.engine.kv_cache import BatchCache


def cache_argument(model: Any) -> str:
    """The name of the forward's cache argument: transformers renamed `past_key_values` to
    `cache` (5.2x); whichever this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def probe_model(model: Any, name: str = "model") -> None:
    """Check that the engine can run `model` as it will: prefill a short prompt, join its cache
    and a shorter one into one padded batch and decode a step for both rows. Raises
    `RuntimeError` saying why not (a cache that is not plain keys and values, a forward without
    `position_ids` or `logits_to_keep`...), so that a model the engine cannot serve fails to load.

    Two forward passes: the shorter row is the first one's cache cut to its first tokens (what
    a prefill of that prefix would hold), not a prefill of its own; on a busy CPU every pass of
    the whole model counts in the load.
    """
    device, cache_kwarg = model.device, cache_argument(model)
    try:
        with torch.inference_mode():
            cache = DynamicCache()
            ids = torch.tensor([[1, 2, 3]], dtype=torch.long, device=device)
            model(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(3, device=device)[None],
                **{cache_kwarg: cache}, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            batch = BatchCache(device)
            batch.join(cache, 3)
            batch.join(_prefix(cache, 2), 2)
            mask, positions = batch.step_inputs()
            out = model(
                input_ids=torch.ones((2, 1), dtype=torch.long, device=device), attention_mask=mask,
                position_ids=positions, **{cache_kwarg: batch.cache}, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            batch.advance(mask)
            if tuple(out.logits.shape[:2]) != (2, 1):
                raise TypeError(f"a batched step returned logits of shape {tuple(out.logits.shape)}")
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise RuntimeError(f"the chat engine cannot serve model '{name}': {detail}") from exc


def _prefix(cache: DynamicCache, tokens: int) -> DynamicCache:
    """A copy of a batch-of-one cache holding only its first `tokens` tokens (views; joining a
    batch builds new tensors, so the original is left as it was). Layers without plain key and
    value tensors are kept as they are, for `BatchCache.join` to refuse by name."""
    shorter = copy.copy(cache)
    shorter.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in shorter.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            plain: Any = layer
            plain.keys, plain.values = keys[:, :, :tokens], values[:, :, :tokens]
    return shorter


def vocab_size(model: Any) -> int:
    """The width of the model's logits: its output embedding's rows (the config's vocabulary
    when the model has none to show)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)
