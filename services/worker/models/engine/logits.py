"""One draw for a group of rows (the running batch, or newcomers after their prefill): logits
processing, the draw itself, log probabilities, and the constraints' bookkeeping.

In order: logit bias and penalties (`SamplingRows.adjust`), then the constrained rows' masks
(one bitmask for all of them per step; a row whose grammar is complete may only end, so only
EOS is allowed; a row with no allowed token is a dead end and gets no token), then the draw
(`sample`), then the log probabilities of the rows that ask, from the same processed logits at
temperature 1. Each part is skipped when no row of the group uses it. A constraint that raises
fails its own row only (`Draw.failed`), not the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.models.engine.constraint import Constraint, allocate_bitmask
from services.worker.models.engine.sampling import SamplingRows, sample
from services.worker.models.generation import RawLogprob

_BITS = torch.arange(32, dtype=torch.int32)


@dataclass
class Draw:
    """What one draw gave each row."""

    tokens: torch.Tensor
    """[rows] the drawn tokens, on the model's device (a dead end's entry is meaningless)."""
    ids: list[int]
    """The same, as Python ints."""
    logprobs: list[RawLogprob | None] | None
    """Per row, for rows that ask; None when no row does."""
    dead: frozenset[int]
    """Rows whose constraint allowed no token, or failed: they end without one."""
    failed: dict[int, Exception]
    """Rows whose constraint raised, with what it raised."""


def draw(logits: torch.Tensor, rows: SamplingRows, step: torch.Tensor,
         constrained: list[tuple[int, Constraint]], eos: torch.Tensor) -> Draw:
    """Draw the next token of every row from `logits` [rows, vocab]; `constrained` pairs a row
    with its constraint, `eos` holds the end-of-sequence ids (empty: none)."""
    if rows.adjusts:
        logits = rows.adjust(logits)
    dead: frozenset[int] = frozenset()
    failed: dict[int, Exception] = {}
    if constrained:
        logits, dead = _mask(logits.float(), constrained, eos, failed)
    tokens = sample(logits, rows, step, masked=bool(constrained))
    ids = tokens.tolist()
    wanted = rows.logprob_rows
    logprobs = _logprobs(logits, tokens, ids, rows, wanted, dead) if wanted else None
    rows.count(tokens)
    for row, constraint in constrained:
        if row not in dead and not constraint.finished:
            try:
                constraint.advance(ids[row])
            except Exception as exc:  # one request's grammar must not fail the batch
                failed[row] = exc
    return Draw(tokens, ids, logprobs, dead | frozenset(failed), failed)


def _mask(logits: torch.Tensor, constrained: list[tuple[int, Constraint]], eos: torch.Tensor,
          failed: dict[int, Exception]) -> tuple[torch.Tensor, frozenset[int]]:
    """Forbid, in each constrained row, the tokens its constraint does not allow; a row whose
    constraint raises is noted in `failed` and allowed nothing."""
    vocab = logits.shape[-1]
    bitmask = allocate_bitmask(len(constrained), vocab)
    for n, (row, constraint) in enumerate(constrained):
        try:
            if not constraint.finished:
                constraint.fill_mask(bitmask, n)
        except Exception as exc:  # one request's grammar must not fail the batch
            failed[row] = exc
            bitmask[n] = 0
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).reshape(len(constrained), -1)[:, :vocab].bool()
    ended = [n for n, (row, constraint) in enumerate(constrained) if row not in failed and constraint.finished]
    if ended:
        only_eos = torch.zeros((vocab,), dtype=torch.bool)
        only_eos[eos[(eos >= 0) & (eos < vocab)].cpu()] = True
        allowed[ended] = only_eos
    allowed = allowed.to(logits.device)
    index = torch.tensor([row for row, _ in constrained], device=logits.device)
    blocked = ~allowed.any(dim=-1)
    # A dead end's row draws from zeros (no NaN from an all -inf softmax); its token is dropped.
    logits[index] = logits[index].masked_fill(~allowed, float("-inf")).masked_fill(blocked[:, None], 0.0)
    dead = frozenset(constrained[n][0] for n in blocked.nonzero().flatten().tolist())
    return logits, dead


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, ids: list[int], rows: SamplingRows,
              wanted: list[int], dead: frozenset[int]) -> list[RawLogprob | None]:
    """Each asking row's drawn token's log probability and its top alternatives."""
    index = torch.tensor(wanted, device=logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[index][:, None]).squeeze(1).tolist()
    counts = [rows.knobs[row].top_logprobs for row in wanted]
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if max(counts) > 0:
        best = logprobs.topk(min(max(counts), logprobs.shape[-1]), dim=-1)
        top_values, top_ids = best.values.tolist(), best.indices.tolist()
    result: list[RawLogprob | None] = [None] * rows.rows
    for n, row in enumerate(wanted):
        if row in dead:
            continue
        top = tuple((token, value) for token, value in zip(top_ids[n][: counts[n]], top_values[n][: counts[n]],
                                                           strict=True) if value != float("-inf"))
        result[row] = RawLogprob(ids[row], chosen[n], top)
    return result
