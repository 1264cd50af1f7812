"""The chat engine's scheduler on its own (no model): which newcomers each turn prefills."""

from __future__ import annotations

import asyncio

import torch

from services.worker.models.engine.sampling import SamplingRow
from services.worker.models.engine.scheduler import Batch, Scheduler, Sequence
from services.worker.models.generation import Sampling, TokenStream


def newcomers(scheduler: Scheduler, *sizes: tuple[int, int]) -> list[Sequence]:
    """Queue one sequence per (prompt tokens, max new tokens)."""
    loop = asyncio.new_event_loop()
    queued = []
    for n, (prompt, max_new) in enumerate(sizes):
        sequence = Sequence(f"s{n}", list(range(1, prompt + 1)), max_new, SamplingRow.of(Sampling()),
                            TokenStream(loop, lambda: None))
        scheduler.add(sequence)
        queued.append(sequence)
    loop.close()
    return queued


def test_short_prompts_that_arrive_together_are_prefilled_in_one_pass() -> None:
    scheduler = Scheduler(capacity_tokens=4096, max_rows=16, max_batch_tokens=40)
    queued = newcomers(scheduler, (10, 8), (8, 8), (12, 8), (5, 8))
    batch = Batch(torch.device("cpu"))
    first = scheduler.next_turn(batch)
    assert first is not None and first.prefill is None
    assert first.prefills == queued[:3]  # a fourth row would make 4 x 12 > 40 padded tokens
    second = scheduler.next_turn(batch)
    assert second is not None and second.prefills == queued[3:]


def test_a_prompt_longer_than_one_pass_is_prefilled_alone() -> None:
    scheduler = Scheduler(capacity_tokens=4096, max_rows=16, max_batch_tokens=40)
    queued = newcomers(scheduler, (100, 8), (5, 8))
    turn = scheduler.next_turn(Batch(torch.device("cpu")))
    assert turn is not None and turn.prefill is queued[0] and turn.prefills == []


def test_newcomers_prefilled_together_stay_within_the_cache_budget() -> None:
    # Each request ends at 10 + 29 = 39 columns: two fit in 96 tokens, three do not.
    scheduler = Scheduler(capacity_tokens=96, max_rows=16, max_batch_tokens=512)
    queued = newcomers(scheduler, (10, 30), (10, 30), (10, 30))
    turn = scheduler.next_turn(Batch(torch.device("cpu")))
    assert turn is not None and turn.prefills == queued[:2]


def test_without_a_pass_size_one_newcomer_is_prefilled_per_turn() -> None:
    scheduler = Scheduler(capacity_tokens=4096, max_rows=16)
    queued = newcomers(scheduler, (10, 8), (8, 8))
    turn = scheduler.next_turn(Batch(torch.device("cpu")))
    assert turn is not None and turn.prefill is queued[0] and turn.prefills == []
