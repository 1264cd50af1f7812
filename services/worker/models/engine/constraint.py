"""What the chat engine asks of a decoding constraint (a grammar a sequence's tokens must follow).

The engine holds one `Constraint` per constrained sequence. Before each draw it asks every
constrained row of the batch for its allowed tokens (`fill_mask` into one shared bitmask),
masks the logits of those rows at once, draws, and tells each row its token (`advance`). A
row whose grammar is complete (`finished`) may only end: the engine then allows only EOS.

Implementations live in `services.worker.models.structured` (the grammar engine); the engine
knows only this interface, and is tested with any implementation of it.
"""

from __future__ import annotations

import abc

import torch


class Constraint(abc.ABC):
    """One sequence's grammar state; used from the engine's thread only."""

    @abc.abstractmethod
    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]`: an int32 tensor of
        ceil(vocab / 32) words, bit `i % 32` of word `i // 32` set when token `i` is allowed
        (the layout of `allocate_bitmask`). Ids beyond the tokenizer's vocabulary (padding
        rows of the logits) are never allowed."""

    @abc.abstractmethod
    def advance(self, token_id: int) -> None:
        """Take the drawn token (one that `fill_mask` allowed)."""

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """Whether the grammar is complete: nothing but EOS may follow."""


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A zeroed bitmask for `rows` rows over `vocab_size` logits (int32 words)."""
    return torch.zeros((rows, (vocab_size + 31) // 32), dtype=torch.int32)
