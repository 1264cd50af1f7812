"""Which sequences run: the waiting queue, the ones being prefilled, and the running batch.

The engine's thread asks for its next turn (`Scheduler.next_turn`), which blocks while there
is nothing to do. Newcomers wait in arrival order and are admitted to prefill when the batch
has room for them: free rows, and a padded cache that stays within its token budget until
every row, the newcomers' included, has generated all it may (rows x the longest row at its
end). Rows only shrink or end after that, so the running batch never outgrows the budget. A
batch that is empty always admits one, so a request larger than the budget still runs, alone.

Given the size of a prefill pass (`max_batch_tokens`), the scheduler admits as many short
prompts as fit in one pass (`Turn.prefills`, rows x the longest prompt), so that newcomers
arriving together join the batch together, after one pass instead of one turn each; a longer
prompt is prefilled alone, in chunks (`Turn.prefill`). Without it, one newcomer per turn.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from services.worker.models.engine.constraint import Constraint
from services.worker.models.engine.kv_cache import BatchCache
from services.worker.models.engine.sampling import SamplingRow, SamplingRows
from services.worker.models.engine.stops import StopWatch
from services.worker.models.generation import TokenStream


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    id: str
    prompt: list[int]
    max_new: int
    sampling: SamplingRow
    stream: TokenStream
    prefilled: int = 0
    """Prompt tokens already in `cache` (a long prompt is prefilled in chunks)."""
    cache: DynamicCache | None = None
    """Its own cache while it is prefilled; it moves into the batch's when it joins."""
    request_id: str = ""
    """The request it serves, for the engine thread's log records about it."""
    constraint: Constraint | None = None
    """The grammar its tokens follow, if any."""
    stops: StopWatch | None = None
    """Its stop sequences, if any."""
    generated: int = 0
    """Tokens drawn for it so far."""
    failure: Exception | None = None
    """What ended it with an error (its constraint raised); its stream ends with it."""


@dataclass
class Turn:
    """What one step of the engine does: drop the cancelled, prefill either one chunk of a long
    prompt (`prefill`) or several short prompts together in one pass (`prefills`), then decode."""

    cancelled: set[str] = field(default_factory=set)
    prefill: Sequence | None = None
    prefills: list[Sequence] = field(default_factory=list)


class Scheduler:
    """The queue and admission; thread-safe (the event loop adds and cancels, the engine takes turns)."""

    def __init__(self, capacity_tokens: int, max_rows: int, max_batch_tokens: int | None = None) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        """Padded prompt tokens one prefill pass may take; None: one newcomer per turn."""
        self._wake = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._cancelled: set[str] = set()
        self._stopping = False
        self._crash: str | None = None

    @property
    def queued(self) -> int:
        """Sequences waiting or being prefilled."""
        with self._wake:
            return len(self._waiting) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        """Sequences waiting for their prefill."""
        with self._wake:
            return len(self._waiting)

    def add(self, sequence: Sequence) -> None:
        """Queue a newcomer."""
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()

    def cancel(self, sequence_id: str) -> None:
        """Drop a sequence at the next turn, wherever it is."""
        with self._wake:
            self._waiting = deque(s for s in self._waiting if s.id != sequence_id)
            self._cancelled.add(sequence_id)
            self._wake.notify()

    def stop(self) -> None:
        """Make `next_turn` return None."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def crash(self, reason: str) -> None:
        """Make `next_turn` raise `RuntimeError(reason)` (a test hook)."""
        with self._wake:
            self._crash = reason
            self._wake.notify()

    def clear(self) -> None:
        """Forget every sequence (the engine died or stopped)."""
        with self._wake:
            self._waiting.clear()
            self._prefilling = None

    def prefilled(self) -> None:
        """The sequence being prefilled is done (joined the batch, or finished)."""
        with self._wake:
            self._prefilling = None

    def next_turn(self, batch: Batch) -> Turn | None:
        """Wait until there is work; None once stopping."""
        with self._wake:
            while True:
                if self._crash is not None:
                    raise RuntimeError(self._crash)
                if self._stopping:
                    return None
                turn = Turn(cancelled=self._cancelled)
                self._cancelled = set()
                if self._prefilling is not None and self._prefilling.id in turn.cancelled:
                    self._prefilling = None
                if self._prefilling is None and self._waiting:
                    self._admit(turn, batch)
                turn.prefill = self._prefilling
                if turn.prefill is not None or turn.prefills or batch.rows or turn.cancelled:
                    return turn
                self._wake.wait()

    def _admit(self, turn: Turn, batch: Batch) -> None:
        """Take the newcomers to prefill this turn, in arrival order: a prompt longer than one pass
        alone (chunked, over several turns), else as many short ones as fit the batch and one pass."""
        head = self._waiting[0]
        if self.max_batch_tokens is None or len(head.prompt) > self.max_batch_tokens:
            if self._fits([head], batch):
                self._prefilling = self._waiting.popleft()
            return
        group: list[Sequence] = []
        while self._waiting:
            candidate = [*group, self._waiting[0]]
            width = max(len(s.prompt) for s in candidate)
            if len(candidate) * width > self.max_batch_tokens or not self._fits(candidate, batch):
                break
            group.append(self._waiting.popleft())
        turn.prefills = group

    def _fits(self, newcomers: list[Sequence], batch: Batch) -> bool:
        if batch.rows == 0 and len(newcomers) == 1:
            return True
        rows = batch.rows + len(newcomers)
        # A newcomer joins with its prompt and its first token drawn: max_new - 1 steps left.
        columns = max(batch.final_columns(), *(len(s.prompt) + s.max_new - 1 for s in newcomers))
        return rows <= self.max_rows and rows * columns <= self.capacity_tokens


class Batch:
    """The running sequences and their per-row state, as tensors in batch-row order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sequences: list[Sequence] = []
        self.cache = BatchCache(device)
        self.last = torch.zeros((0,), dtype=torch.long, device=device)
        """The last token of each row: the next step's input."""
        self.generated = torch.zeros((0,), dtype=torch.long, device=device)
        self.max_new = torch.zeros((0,), dtype=torch.long, device=device)
        self.sampling: SamplingRows | None = None
        self.constrained: list[tuple[int, Constraint]] = []
        """The rows that follow a constraint, with it."""

    @property
    def rows(self) -> int:
        """Running sequences."""
        return len(self.sequences)

    def final_columns(self) -> int:
        """The longest row once every row has decoded all it may: the most columns it can reach."""
        if not self.rows:
            return 0
        return int((self.cache.lengths + self.max_new - self.generated).max())

    def join(self, sequence: Sequence, first_token: torch.Tensor, sampling: SamplingRows) -> None:
        """Add a sequence whose prompt is prefilled (its `cache`) and first token drawn."""
        assert sequence.cache is not None
        cache, sequence.cache = sequence.cache, None
        self.join_many([sequence], cache, first_token.reshape(1), sampling)

    def join_many(self, sequences: list[Sequence], cache: DynamicCache, first_tokens: torch.Tensor,
                  sampling: SamplingRows) -> None:
        """Add sequences prefilled together: `cache` holds their prompts as rows, left-padded."""
        self.cache.join(cache, [len(s.prompt) for s in sequences])
        self.sequences.extend(sequences)
        self.last = torch.cat([self.last, first_tokens])
        self.generated = torch.cat([self.generated, torch.ones_like(first_tokens)])
        self.max_new = torch.cat([self.max_new, torch.tensor([s.max_new for s in sequences], device=self.device)])
        self.sampling = sampling if self.sampling is None else self.sampling.concat(sampling)
        self._index()

    def keep(self, keep: torch.Tensor) -> list[Sequence]:
        """Keep the rows where `keep` (bool, per row) is set; return the sequences dropped."""
        index = keep.nonzero().flatten()
        kept = set(index.tolist())
        dropped = [s for i, s in enumerate(self.sequences) if i not in kept]
        self.sequences = [self.sequences[i] for i in sorted(kept)]
        self.cache.keep(index)
        self.last, self.generated, self.max_new = self.last[index], self.generated[index], self.max_new[index]
        self.sampling = self.sampling.select(index) if self.sampling is not None and self.rows else None
        self._index()
        return dropped

    def _index(self) -> None:
        """Note which rows need per-row work each step (after rows joined or left)."""
        self.constrained = [(i, s.constraint) for i, s in enumerate(self.sequences) if s.constraint is not None]

    def drop(self, sequence_ids: set[str]) -> list[Sequence]:
        """Drop the rows of these sequences (cancelled); return those found."""
        if not any(s.id in sequence_ids for s in self.sequences):
            return []
        keep = torch.tensor([s.id not in sequence_ids for s in self.sequences], device=self.device)
        return self.keep(keep)
