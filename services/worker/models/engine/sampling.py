"""Next-token choice on tensors, for a whole batch at once: greedy, temperature, top-k and top-p.

Random draws come from a counter-based hash of (seed, step), not from a shared RNG: a
sequence gets the same random draws whether it runs alone or in any batch, with no
per-sequence Python work per token. (The logits it draws from may still differ slightly with
the batch, by reduction order on a GPU or in bf16, so a draw can land on another token.)

The knobs that change the logits before the draw (penalties, logit bias; see `logits.py`) are
kept here too, per row, with the state they need (each row's counts of generated tokens). Parts
no row of the batch uses are None, so plain rows pay nothing for them.
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
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = -1
    """Alternatives to report with each token's log probability; -1: no log probabilities."""

    @classmethod
    def of(cls, sampling: Sampling) -> SamplingRow:
        """Knobs of a request; an unseeded request gets a fresh random seed. Top-k 1 is greedy."""
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        seed &= (1 << 64) - 1
        return cls(
            sampling.temperature, sampling.top_p, sampling.greedy or sampling.top_k == 1,
            seed & _MASK32, seed >> 32, top_k=sampling.top_k,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            logit_bias=tuple((token, bias) for token, bias in sampling.logit_bias if bias),
            top_logprobs=sampling.top_logprobs if sampling.logprobs else -1,
        )  # fmt: skip

    @property
    def penalised(self) -> bool:
        """Whether presence or frequency penalties apply."""
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class SamplingRows:
    """The knobs of every row of a batch, as tensors (one entry per row), and the per-row
    state of the logits processing (`counts`). Optional parts are None when no row uses them."""

    knobs: tuple[SamplingRow, ...]
    temperature: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    seed: torch.Tensor
    top_k: torch.Tensor | None = None
    """[rows] tokens kept by top-k (0: no limit); None: no row limits."""
    penalties: torch.Tensor | None = None
    """[rows, 2]: presence and frequency penalty; None: no row is penalised."""
    counts: torch.Tensor | None = None
    """[rows, vocab] float: how often each token was generated so far (with `penalties`)."""
    bias: torch.Tensor | None = None
    """[rows, vocab] float: logit bias; None: no row has one."""

    @classmethod
    def of(cls, rows: list[SamplingRow], device: torch.device, vocab: int) -> SamplingRows:
        """Tensors for `rows`, in order, over logits of `vocab` tokens."""
        seed_hi = torch.tensor([r.seed_hi for r in rows], dtype=torch.long, device=device)
        seed_lo = torch.tensor([r.seed_lo for r in rows], dtype=torch.long, device=device)
        made = cls(
            knobs=tuple(rows),
            temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device),
            top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device),
            greedy=torch.tensor([r.greedy for r in rows], dtype=torch.bool, device=device),
            seed=_mix(seed_lo ^ _mix(seed_hi)),
        )
        if any(r.top_k > 0 and not r.greedy for r in rows):
            made.top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long, device=device)
        if any(r.penalised for r in rows):
            made.penalties = torch.tensor([[r.presence_penalty, r.frequency_penalty] for r in rows], device=device)
            made.counts = torch.zeros((len(rows), vocab), dtype=torch.float32, device=device)
        if any(r.logit_bias for r in rows):
            bias = torch.zeros((len(rows), vocab), dtype=torch.float32)
            for i, row in enumerate(rows):
                for token, value in row.logit_bias:
                    bias[i, token] = value
            made.bias = bias.to(device)
        return made

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return len(self.knobs)

    @property
    def adjusts(self) -> bool:
        """Whether some row's logits change before the draw (penalties or bias)."""
        return self.penalties is not None or self.bias is not None

    @property
    def top_k_bound(self) -> int:
        """The largest top-k when every sampling (not greedy) row sets one: no token ranked past
        it can be drawn; 0 otherwise."""
        limits = [r.top_k for r in self.knobs if not r.greedy]
        return max(limits) if limits and all(limits) else 0

    @property
    def logprob_rows(self) -> list[int]:
        """The rows that report log probabilities."""
        return [i for i, r in enumerate(self.knobs) if r.top_logprobs >= 0]

    def select(self, index: torch.Tensor) -> SamplingRows:
        """The rows at `index`, in that order; parts no remaining row uses are dropped."""
        knobs = tuple(self.knobs[i] for i in index.tolist())
        uses_top_k = any(r.top_k > 0 and not r.greedy for r in knobs)
        penalised = any(r.penalised for r in knobs)
        return SamplingRows(
            knobs, self.temperature[index], self.top_p[index], self.greedy[index], self.seed[index],
            top_k=self.top_k[index] if self.top_k is not None and uses_top_k else None,
            penalties=self.penalties[index] if self.penalties is not None and penalised else None,
            counts=self.counts[index] if self.counts is not None and penalised else None,
            bias=self.bias[index] if self.bias is not None and any(r.logit_bias for r in knobs) else None,
        )  # fmt: skip

    def concat(self, other: SamplingRows) -> SamplingRows:
        """These rows followed by `other`'s."""
        vocab = next((t.shape[1] for t in (self.counts, self.bias, other.counts, other.bias) if t is not None), 0)
        return SamplingRows(
            self.knobs + other.knobs,
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            torch.cat([self.greedy, other.greedy]),
            torch.cat([self.seed, other.seed]),
            top_k=_cat(self.top_k, self.rows, other.top_k, other.rows, ()),
            penalties=_cat(self.penalties, self.rows, other.penalties, other.rows, (2,)),
            counts=_cat(self.counts, self.rows, other.counts, other.rows, (vocab,)),
            bias=_cat(self.bias, self.rows, other.bias, other.rows, (vocab,)),
        )

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [rows, vocab] with each row's bias and penalties applied (OpenAI's
        definitions: presence once per token generated so far, frequency per occurrence)."""
        adjusted = logits.float()
        if self.bias is not None:
            adjusted = adjusted + self.bias
        if self.penalties is not None and self.counts is not None:
            presence, frequency = self.penalties[:, :1], self.penalties[:, 1:]
            adjusted = adjusted - presence * (self.counts > 0) - frequency * self.counts
        return adjusted

    def count(self, tokens: torch.Tensor) -> None:
        """Record each row's newly drawn token (for penalties)."""
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))


def _cat(first: torch.Tensor | None, first_rows: int, second: torch.Tensor | None, second_rows: int,
         shape: tuple[int, ...]) -> torch.Tensor | None:
    """Two optional per-row tensors as one: a missing side is zeros for its rows."""
    if first is None and second is None:
        return None
    present = first if first is not None else second
    assert present is not None

    def filled(rows: int) -> torch.Tensor:
        return torch.zeros((rows, *shape), dtype=present.dtype, device=present.device)

    return torch.cat([first if first is not None else filled(first_rows),
                      second if second is not None else filled(second_rows)])


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


def sample(logits: torch.Tensor, rows: SamplingRows, step: torch.Tensor, masked: bool = False) -> torch.Tensor:
    """The next token of every row: `logits` is [rows, vocab], `step` the row's tokens generated
    so far. `masked`: some logits are -inf (forbidden tokens), never drawn."""
    best = logits.argmax(dim=-1)
    if bool(rows.greedy.all()):
        return best
    scaled = logits.float() / rows.temperature.clamp_min(1e-6)[:, None]
    bound = rows.top_k_bound if rows.top_k is not None else 0
    if 0 < bound < logits.shape[-1]:  # only the k most likely can be drawn: no need to sort the rest
        probs, order = scaled.softmax(dim=-1).topk(bound, dim=-1)
    else:
        probs, order = scaled.softmax(dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs
    inside = before < rows.top_p[:, None]  # the most likely token is always kept
    if rows.top_k is not None:
        limit = torch.where(rows.top_k > 0, rows.top_k, probs.shape[-1])
        inside &= torch.arange(probs.shape[-1], device=probs.device)[None] < limit[:, None]
    if masked:
        inside &= probs > 0  # rounding can leave `before` under top_p across forbidden tokens
    kept = probs * inside
    cumulative = kept.double().cumsum(dim=-1)
    target = uniforms(rows.seed, step) * cumulative[:, -1]
    # u x total can round up to total: the draw is then the last kept token, never one past top-p.
    index = torch.minimum((cumulative <= target[:, None]).sum(dim=-1), inside.sum(dim=-1) - 1)
    drawn = order.gather(-1, index[:, None]).squeeze(-1)
    return torch.where(rows.greedy, best, drawn)
