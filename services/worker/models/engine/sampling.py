"""Next-token choice on tensors, for a whole batch at once: greedy, temperature and top-p.

Random draws come from a counter-based hash of (seed, step), not from a shared RNG: a
sequence gets the same random draws whether it runs alone or in any batch, with no
per-sequence Python work per token. (The logits it draws from may still differ slightly with
the batch, by reduction order on a GPU or in bf16, so a draw can land on another token.)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from services.worker.models.generation import Sampling

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # under 2**31: products of 32-bit values stay inside int64


@dataclass(frozen=True)
class SamplingRow:
    """One sequence's sampling knobs, as the engine stores them per batch row."""

    temperature: float
    top_p: float
    greedy: bool
    seed_lo: int
    seed_hi: int

    @classmethod
    def of(cls, sampling: Sampling) -> SamplingRow:
        """Knobs of a request; an unseeded request gets a fresh random seed."""
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        seed &= (1 << 64) - 1
        return cls(sampling.temperature, sampling.top_p, sampling.greedy, seed & _MASK32, seed >> 32)


@dataclass
class SamplingRows:
    """The knobs of every row of a batch, as tensors (one entry per row)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def of(cls, rows: list[SamplingRow], device: torch.device) -> SamplingRows:
        """Tensors for `rows`, in order."""
        seed_hi = torch.tensor([r.seed_hi for r in rows], dtype=torch.long, device=device)
        seed_lo = torch.tensor([r.seed_lo for r in rows], dtype=torch.long, device=device)
        return cls(
            temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device),
            top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device),
            greedy=torch.tensor([r.greedy for r in rows], dtype=torch.bool, device=device),
            seed=_mix(seed_lo ^ _mix(seed_hi)),
        )

    def select(self, index: torch.Tensor) -> SamplingRows:
        """The rows at `index`, in that order."""
        return SamplingRows(self.temperature[index], self.top_p[index], self.greedy[index], self.seed[index])

    def concat(self, other: SamplingRows) -> SamplingRows:
        """These rows followed by `other`'s."""
        return SamplingRows(
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            torch.cat([self.greedy, other.greedy]),
            torch.cat([self.seed, other.seed]),
        )


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values in [0, 2**32)), elementwise."""
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def uniforms(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One number in [0, 1) per row, a function of (row seed, step) only."""
    high = _mix((seed + ((step * 0x9E3779B1) & _MASK32)) & _MASK32)
    low = _mix(high ^ 0x5BD1E995)
    return (high.double() * 2.0**21 + (low >> 11).double()) / 2.0**53


def sample(logits: torch.Tensor, rows: SamplingRows, step: torch.Tensor) -> torch.Tensor:
    """The next token of every row: `logits` is [rows, vocab], `step` the row's tokens generated so far."""
    best = logits.argmax(dim=-1)
    if bool(rows.greedy.all()):
        return best
    scaled = logits.float() / rows.temperature.clamp_min(1e-6)[:, None]
    probs, order = scaled.softmax(dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs
    inside = before < rows.top_p[:, None]  # the most likely token is always kept
    kept = probs * inside
    cumulative = kept.double().cumsum(dim=-1)
    target = uniforms(rows.seed, step) * cumulative[:, -1]
    # u x total can round up to total: the draw is then the last kept token, never one past top-p.
    index = torch.minimum((cumulative <= target[:, None]).sum(dim=-1), inside.sum(dim=-1) - 1)
    drawn = order.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(rows.greedy, best, drawn)
