"""A padded batch KV cache that sequences join and leave between decode steps.

Rows are left-padded to a common length: row i's real tokens are the last `lengths[i]`
columns, and `mask` marks them. A newcomer's own cache (from its prefill) is padded on the
left to the batch's length (or the batch to its) and appended as a row; a row that leaves is
dropped, and columns that no remaining row uses are trimmed from the left. Each decode step
appends one column for every row. Positions (RoPE) come from each row's own length, so a
sequence sees the same positions and keys as it would alone.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def kv_bytes_per_token(model: object) -> int:
    """Bytes of keys and values one token takes in the cache, from the model's shape."""
    config = model.config.get_text_config()  # type: ignore[attr-defined]
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize  # type: ignore[attr-defined]


class BatchCache:
    """Keys and values of the running batch, with each row's padding mask and length."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        """[rows, columns]: 1 where the column holds one of the row's tokens."""
        self.lengths = torch.zeros((0,), dtype=torch.long, device=device)
        """[rows]: tokens in each row (the position of its next token)."""

    @property
    def rows(self) -> int:
        """Sequences in the batch."""
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        """The padded length every row has."""
        return int(self.mask.shape[1])

    def join(self, cache: DynamicCache, lengths: int | list[int]) -> None:
        """Append sequences whose own cache holds them as rows, left-padded to the longest:
        `lengths` tokens each (one int: a cache of one row)."""
        lengths = [lengths] if isinstance(lengths, int) else lengths
        new_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        own = max(lengths)
        new_mask = (torch.arange(own, device=self.device)[None] >= (own - new_lengths)[:, None]).long()
        if self.cache is None or self.rows == 0:
            self.cache, self.mask, self.lengths = cache, new_mask, new_lengths
            return
        width = max(self.columns, own)
        grow, pad = width - self.columns, width - own
        for (mine, my_keys, my_values), (_, keys, values) in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(my_keys, grow), _pad_left(keys, pad)])
            mine.values = torch.cat([_pad_left(my_values, grow), _pad_left(values, pad)])
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(new_mask, (pad, 0))])
        self.lengths = torch.cat([self.lengths, new_lengths])

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` (in that order), then trim columns no row uses."""
        if index.numel() == 0:
            self.cache = None
            self.mask = self.mask[:0, :0]
            self.lengths = self.lengths[:0]
            return
        assert self.cache is not None
        self.mask = self.mask[index]
        unused = self.columns - int(self.lengths[index].max())
        self.mask = self.mask[:, unused:]
        self.lengths = self.lengths[index]
        for layer, keys, values in _layers(self.cache):
            layer.keys = keys[index, :, unused:]
            layer.values = values[index, :, unused:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask (with the new column) and position ids of the next decode step."""
        ones = torch.ones((self.rows, 1), dtype=torch.long, device=self.device)
        return torch.cat([self.mask, ones], dim=1), self.lengths[:, None]

    def advance(self, mask: torch.Tensor) -> None:
        """Record the decode step just run with `mask` (from `step_inputs`)."""
        self.mask = mask
        self.lengths = self.lengths + 1


def _layers(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each layer with its keys and values; only plain key/value layers can be padded and joined."""
    layers = []
    for layer in cache.layers:
        # Exactly DynamicLayer: its subclasses (sliding windows...) keep other shapes than all columns.
        if type(layer) is not DynamicLayer or getattr(layer, "is_sliding", False):
            raise TypeError(f"the chat engine cannot batch a cache layer of type {type(layer).__name__}")
        plain = cast(DynamicLayer, layer)
        if plain.keys is None or plain.values is None:
            raise TypeError(f"the chat engine cannot batch a cache layer of type {type(layer).__name__}")
        layers.append((plain, plain.keys, plain.values))
    return layers


def _pad_left(states: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero columns before the sequence axis (dim 2) of [batch, heads, seq, head_dim]."""
    return F.pad(states, (0, 0, columns, 0)) if columns else states
