"""The chat engine's sampling knobs on a tiny random-weight Llama (no gRPC): logit bias,
presence and frequency penalties, top-k, log probabilities, seeds, stop sequences and
constraints do what a client asks, in the first token as in the rest, alone or batched.

References come from transformers' own `generate` with a logits processor that applies
OpenAI's definitions, so the engine is checked against an independent implementation.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tiny_models import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from services.common.errors import InvalidArgument
from services.worker.models.engine import BatchingSettings, ChatEngine
from services.worker.models.engine.constraint import Constraint
from services.worker.models.generation import RawLogprob, Sampling, TokenStream

GREEDY = Sampling(temperature=0)
SHORT, LONG, LOOPING = [5, 6, 7], list(range(10, 47)), list(range(50, 62))
"""LONG is prefilled alone in chunks of 8 (the engine's `_prefill`), the others together with
whatever arrives with them; LOOPING's greedy answer repeats two tokens over and over."""
PROMPTS = [SHORT, LONG, [9], LOOPING]


@dataclass
class Answer:
    """What one request got."""

    tokens: list[int]
    logprobs: list[RawLogprob] = field(default_factory=list)
    stop_sequence: str = ""
    finish_reason: str | None = None


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_llama(tmp_path_factory.mktemp("sampling") / "tiny")


@pytest.fixture(scope="module")
def model(folder: Any) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(folder: Any) -> Any:
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
async def engine(model: Any, tokenizer: Any) -> AsyncIterator[ChatEngine]:
    engine = ChatEngine(model, 4096, [tokenizer.eos_token_id], BatchingSettings(max_batch_tokens=8), name="tiny",
                        tokenizer=tokenizer)  # fmt: skip
    yield engine
    await engine.close()


async def answer(engine: ChatEngine, prompt: list[int], n: int, sampling: Sampling = GREEDY,
                 constraint: Constraint | None = None) -> Answer:
    stream: TokenStream = engine.submit(prompt, sampling, n, constraint=constraint)
    got = Answer([])
    async for ids in stream:
        got.tokens += ids
        got.logprobs += stream.take_logprobs()
    got.stop_sequence, got.finish_reason = stream.stop_sequence, stream.finish_reason
    return got


class OpenAIAdjustments(LogitsProcessor):
    """OpenAI's logit bias and penalties, over the tokens generated after the prompt."""

    def __init__(self, prompt_length: int, presence: float = 0.0, frequency: float = 0.0,
                 bias: dict[int, float] | None = None) -> None:
        self.prompt_length, self.presence, self.frequency, self.bias = prompt_length, presence, frequency, bias or {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        adjusted = scores - self.presence * (counts > 0) - self.frequency * counts
        for token, bias in self.bias.items():
            adjusted[:, token] += bias
        return adjusted  # type: ignore[return-value]


def reference(model: Any, prompt: list[int], n: int, **adjustments: Any) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens from `generate` with the adjustments, and each step's log probabilities."""
    ids = torch.tensor([prompt])
    processors = LogitsProcessorList([OpenAIAdjustments(len(prompt), **adjustments)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         logits_processor=processors)  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [s[0].log_softmax(-1) for s in out.scores]


async def test_a_large_logit_bias_forces_a_token_and_a_negative_one_bans_it(engine: ChatEngine) -> None:
    for prompt in (SHORT, LONG):  # the first token comes from either prefill path
        plain = (await answer(engine, prompt, 12)).tokens
        forced = next(t for t in range(20, 200) if t not in plain)
        assert (await answer(engine, prompt, 12, Sampling(temperature=0, logit_bias=((forced, 100.0),)))).tokens \
            == [forced] * 12
        banned = (await answer(engine, prompt, 12, Sampling(temperature=0, logit_bias=((plain[0], -100.0),)))).tokens
        assert plain[0] not in banned and banned != plain
        sampled = Sampling(temperature=1.0, seed=5, logit_bias=((plain[0], -100.0),))
        assert plain[0] not in (await answer(engine, prompt, 12, sampled)).tokens


async def test_penalties_suppress_repeated_tokens_as_openai_defines_them(engine: ChatEngine, model: Any) -> None:
    plain = (await answer(engine, LOOPING, 30)).tokens
    looped, times = Counter(plain).most_common(1)[0]
    assert times >= 10  # the greedy answer loops on a token
    for presence, frequency in ((0.0, 2.0), (2.0, 0.0), (1.0, 0.5)):
        asked = Sampling(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
        penalised = (await answer(engine, LOOPING, 30, asked)).tokens
        expected, _ = reference(model, LOOPING, 30, presence=presence, frequency=frequency)
        assert penalised == expected
        assert Counter(penalised)[looped] < times and len(set(penalised)) > len(set(plain))
    # A negative penalty makes repetition more likely, never less.
    encouraged = (await answer(engine, SHORT, 30, Sampling(temperature=0, frequency_penalty=-2.0))).tokens
    assert encouraged == reference(model, SHORT, 30, frequency=-2.0)[0]
    assert len(set(encouraged)) <= len(set((await answer(engine, SHORT, 30)).tokens))


async def test_top_k_one_is_greedy_and_top_k_keeps_draws_among_the_k_most_likely(engine: ChatEngine) -> None:
    for prompt in PROMPTS:
        greedy = (await answer(engine, prompt, 20)).tokens
        assert (await answer(engine, prompt, 20, Sampling(temperature=1.5, top_k=1, seed=3))).tokens == greedy
    wide = Sampling(temperature=5.0, seed=11, top_k=2, logprobs=True, top_logprobs=2)
    got = await answer(engine, SHORT, 40, wide)
    assert all(lp.token_id in [token for token, _ in lp.top] for lp in got.logprobs)
    assert any(lp.token_id != lp.top[0][0] for lp in got.logprobs)  # hot enough to draw the second one
    unlimited = await answer(engine, SHORT, 40, Sampling(temperature=5.0, seed=11, logprobs=True, top_logprobs=2))
    assert any(lp.token_id not in [token for token, _ in lp.top] for lp in unlimited.logprobs)


async def test_logprobs_are_the_log_softmax_of_the_adjusted_logits(engine: ChatEngine, model: Any) -> None:
    bias = {40: 3.0, 41: -2.0}
    asked = Sampling(temperature=0, logprobs=True, top_logprobs=5, frequency_penalty=0.5,
                     logit_bias=tuple(bias.items()))  # fmt: skip
    for prompt in (SHORT, LONG):
        got = await answer(engine, prompt, 16, asked)
        expected_tokens, steps = reference(model, prompt, 16, frequency=0.5, bias=bias)
        assert got.tokens == expected_tokens and len(got.logprobs) == 16
        for lp, token, step in zip(got.logprobs, got.tokens, steps, strict=True):
            assert lp.token_id == token and lp.logprob <= 0
            assert lp.logprob == pytest.approx(float(step[token]), abs=1e-3)  # cached vs not: float error
            assert len(lp.top) == 5 and lp.top[0] == (token, lp.logprob)  # greedy: the drawn one leads
            values = [value for _, value in lp.top]
            assert values == sorted(values, reverse=True)
            assert [t for t, _ in lp.top] == step.topk(5).indices.tolist()
            assert sum(math.exp(v) for v in values) <= 1 + 1e-6
    sampled = await answer(engine, SHORT, 30, Sampling(temperature=1.0, seed=4, logprobs=True, top_logprobs=3))
    for lp in sampled.logprobs:
        listed = dict(lp.top)
        assert lp.logprob <= 0 and (lp.token_id not in listed or listed[lp.token_id] == lp.logprob)
    without = await answer(engine, SHORT, 8, Sampling(temperature=0, logprobs=True))
    assert [lp.top for lp in without.logprobs] == [()] * 8
    assert (await answer(engine, SHORT, 8)).logprobs == []


async def test_seeded_requests_draw_the_same_tokens_alone_and_batched(engine: ChatEngine) -> None:
    requests = [
        (SHORT, 25, Sampling(temperature=1.0, top_p=0.9, seed=1, presence_penalty=0.7)),
        (LONG, 18, Sampling(temperature=0.8, seed=2, top_k=5, logprobs=True, top_logprobs=2)),
        ([9], 30, Sampling(temperature=1.2, seed=3, logit_bias=((17, 4.0),), frequency_penalty=0.4)),
        (LOOPING, 12, GREEDY),
        (SHORT, 22, Sampling(temperature=1.0, seed=4)),
    ]
    alone = [await answer(engine, p, n, s) for p, n, s in requests]
    # All at once, and again with a long plain request running first that they join.
    together = await asyncio.gather(*(answer(engine, p, n, s) for p, n, s in requests))
    assert [a.tokens for a in together] == [a.tokens for a in alone]
    running = engine.submit(LONG, GREEDY, 200)
    await anext(running)
    joined = await asyncio.gather(*(answer(engine, p, n, s) for p, n, s in requests))
    running.cancel()
    assert [a.tokens for a in joined] == [a.tokens for a in alone]
    assert [[lp.token_id for lp in a.logprobs] for a in joined] == [[lp.token_id for lp in a.logprobs] for a in alone]
    reseeded = await answer(engine, SHORT, 25, Sampling(temperature=1.0, top_p=0.9, seed=99, presence_penalty=0.7))
    assert reseeded.tokens != alone[0].tokens


async def test_a_stop_sequence_ends_generation_at_the_token_that_completes_it(engine: ChatEngine,
                                                                               tokenizer: Any) -> None:
    full = (await answer(engine, SHORT, 30)).tokens
    text = tokenizer.decode(full, skip_special_tokens=True)
    for stop in (tokenizer.decode(full[6:8]), tokenizer.decode(full[4:5])[-2:] + " w"):
        end = next(i for i in range(len(full)) if stop in tokenizer.decode(full[: i + 1]))
        assert end < 29 and stop in text
        got = await answer(engine, SHORT, 30, Sampling(temperature=0, stop=("never there", stop)))
        assert got.tokens == full[: end + 1]  # nothing after the token that completed it is generated
        assert got.stop_sequence == stop and got.finish_reason == "stop"
    first = tokenizer.decode(full[:1])
    got = await answer(engine, SHORT, 30, Sampling(temperature=0, stop=(first,)))
    assert got.tokens == full[:1] and got.stop_sequence == first
    missing = await answer(engine, SHORT, 30, Sampling(temperature=0, stop=("never there",)))
    assert missing.tokens == full and missing.stop_sequence == "" and missing.finish_reason == "length"


class FixedTokens(Constraint):
    """A grammar of exactly `tokens`, in order; `dead_after`: nothing is allowed after that many."""

    def __init__(self, tokens: list[int], dead_after: int | None = None) -> None:
        self.tokens, self.dead_after = tokens, dead_after
        self.taken: list[int] = []

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.dead_after is not None and len(self.taken) >= self.dead_after:
            return
        token = self.tokens[len(self.taken)]
        word, bit = divmod(token, 32)
        bitmask[row, word] = torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)

    def advance(self, token_id: int) -> None:
        assert token_id == self.tokens[len(self.taken)], "the engine drew a token the mask forbade"
        self.taken.append(token_id)

    @property
    def finished(self) -> bool:
        return len(self.taken) == len(self.tokens)


async def test_a_constraint_is_followed_exactly_and_then_only_the_end_token_comes(
        engine: ChatEngine, tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    grammar = [31, 200, 63, 64, 95, 7]  # ids in every bitmask word position, 31 and 63 in the sign bit
    plain = [await answer(engine, p, 10) for p in PROMPTS]
    for prompt in PROMPTS:
        for sampling in (GREEDY, Sampling(temperature=1.0, seed=8, logprobs=True, top_logprobs=3)):
            constraint = FixedTokens(grammar)
            got = await answer(engine, prompt, 20, sampling, constraint)
            assert got.tokens == [*grammar, eos] and got.finish_reason == "stop" and constraint.finished
    # Batched with free requests, which answer as they do alone.
    constraints = [FixedTokens(grammar) for _ in PROMPTS]
    mixed = await asyncio.gather(*(answer(engine, p, 20, GREEDY, c) for p, c in zip(PROMPTS, constraints, strict=True)),
                                 *(answer(engine, p, 10) for p in PROMPTS))  # fmt: skip
    assert [a.tokens for a in mixed[: len(PROMPTS)]] == [[*grammar, eos]] * len(PROMPTS)
    assert [a.tokens for a in mixed[len(PROMPTS) :]] == [a.tokens for a in plain]
    # A forced token is certain: log probability 0, and no forbidden alternative is listed.
    asked = Sampling(temperature=0, logprobs=True, top_logprobs=3)
    forced = await answer(engine, SHORT, 20, asked, FixedTokens(grammar))
    assert [lp.logprob for lp in forced.logprobs] == [0.0] * len(forced.tokens)
    assert [lp.top for lp in forced.logprobs] == [((t, 0.0),) for t in forced.tokens]
    # max_tokens still cuts a grammar short.
    assert (await answer(engine, SHORT, 3, GREEDY, FixedTokens(grammar))).tokens == grammar[:3]


async def test_a_constraint_that_allows_no_token_ends_its_sequence(engine: ChatEngine, model: Any) -> None:
    for prompt in (SHORT, LONG):
        got = await answer(engine, prompt, 20, GREEDY, FixedTokens([31, 200, 63], dead_after=2))
        assert got.tokens == [31, 200] and got.finish_reason == "stop"
        assert (await answer(engine, prompt, 20, GREEDY, FixedTokens([31], dead_after=0))).tokens == []
    without_end = ChatEngine(model, 4096, [], name="tiny")  # a model without an end token cannot end a grammar
    try:
        got = await answer(without_end, SHORT, 20, GREEDY, FixedTokens([31, 200]))
        assert got.tokens == [31, 200] and got.finish_reason == "stop"
    finally:
        await without_end.close()


async def test_finish_reasons_say_why_the_engine_ended(engine: ChatEngine, tokenizer: Any) -> None:
    assert (await answer(engine, SHORT, 5)).finish_reason == "length"
    eos = tokenizer.eos_token_id
    ended = await answer(engine, SHORT, 20, Sampling(temperature=0, logit_bias=((eos, 100.0),)))
    assert ended.tokens == [eos] and ended.finish_reason == "stop"


async def test_requests_the_engine_cannot_serve_are_refused(engine: ChatEngine, model: Any) -> None:
    with pytest.raises(InvalidArgument, match="token id 210 is not in the vocabulary"):
        engine.submit(SHORT, Sampling(logit_bias=((210, 1.0),)), 4)
    blind = ChatEngine(model, 4096, [], name="tiny")
    try:
        with pytest.raises(InvalidArgument, match="stop sequences"):
            blind.submit(SHORT, Sampling(stop=("w1",)), 4)
    finally:
        await blind.close()


class BrokenGrammar(FixedTokens):
    """A constraint whose grammar engine raises once `fails_at` tokens are taken."""

    def __init__(self, tokens: list[int], fails_at: int) -> None:
        super().__init__(tokens)
        self.fails_at = fails_at

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        if len(self.taken) >= self.fails_at:
            raise RuntimeError("the grammar engine broke")
        super().fill_mask(bitmask, row)


async def test_a_failing_constraint_fails_its_request_only(engine: ChatEngine) -> None:
    plain = await answer(engine, LOOPING, 20)
    for fails_at in (0, 2):  # in the first token's draw, and in a decode step
        broken = engine.submit(SHORT, GREEDY, 20, constraint=BrokenGrammar([31, 200, 63], fails_at))
        beside = asyncio.create_task(answer(engine, LOOPING, 20))
        received: list[int] = []
        with pytest.raises(RuntimeError, match="the grammar engine broke"):
            async for ids in broken:
                received += ids
        assert received == [31, 200][:fails_at]
        assert (await beside).tokens == plain.tokens
    assert (await answer(engine, SHORT, 5)).finish_reason == "length"  # the engine still serves
