"""What a request may use, estimated before it runs, and what tokens cost.

The prompt is estimated at one token per four characters, rounded up, plus four tokens per
chat message (its role and the template's markers); token-id inputs count exactly. The
completion is the request's `max_tokens`, else the asset's `generation.max_tokens`, else the
router's `limit_default_completion_tokens`, times the choices asked for (`n`). A request that
sets `max_tokens` therefore never
uses more than it reserved, up to the prompt estimate; the real usage replaces the estimate
when the request settles.

Characters / 4 is an English-text rule of thumb: it underestimates scripts that take a token
(or more) per character, CJK among them, so such a prompt may reserve less than it uses. The
estimate only decides admission; settling charges what the worker reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from roundhouse.v1 import inference_pb2
from services.common.asset_proto import AssetRecord
from services.common.assetspec import Pricing

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Estimate:
    """Tokens and dollars a request may use at most (as far as the router can tell)."""

    tokens: int
    usd: Decimal
    prompt_tokens: int = 0
    """The prompt's part of `tokens` (what a request that stopped early is charged for its
    prompt when the worker reported no usage)."""


def text_tokens(text: str) -> int:
    """The tokens `text` is estimated at: its characters / 4, rounded up."""
    return chars_tokens(len(text))


def chars_tokens(chars: int) -> int:
    """The tokens that many characters of text are estimated at (/ 4, rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


def cost(pricing: Pricing | None, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """US dollars for that many tokens at the asset's prices (0 without pricing)."""
    if pricing is None:
        return Decimal(0)
    return (Decimal(str(pricing.input_per_1m)) * prompt_tokens
            + Decimal(str(pricing.output_per_1m)) * completion_tokens) / MILLION


def chat_prompt_tokens(request: inference_pb2.ChatRequest) -> int:
    """The tokens a chat or completion request's prompt is estimated at."""
    return text_tokens(request.prompt) + sum(
        text_tokens(m.content) + TOKENS_PER_MESSAGE for m in request.messages)


def estimate_chat(request: inference_pb2.ChatRequest, record: AssetRecord,
                  default_completion_tokens: int) -> Estimate:
    """The most a chat or completion request is expected to use."""
    prompt = chat_prompt_tokens(request)
    if request.HasField("max_tokens"):
        completion = request.max_tokens
    else:
        completion = record.spec.generation.max_tokens or default_completion_tokens
    completion *= max(1, request.n)  # each choice may use them all
    return Estimate(prompt + completion, cost(record.spec.pricing, prompt, completion), prompt)


def estimate_embed(request: inference_pb2.EmbedRequest, record: AssetRecord) -> Estimate:
    """What an embedding request uses: its inputs' tokens."""
    tokens = sum(len(i.tokens.ids) if i.HasField("tokens") else text_tokens(i.text)
                 for i in request.inputs)
    return Estimate(tokens, cost(record.spec.pricing, tokens, 0), tokens)
