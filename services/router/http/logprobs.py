"""Log probabilities as OpenAI spells them: chat's `logprobs.content` and the legacy
completions' `logprobs` (tokens, token_logprobs, top_logprobs, text_offset).

The worker sends one `TokenLogprob` per generated token (its text, bytes, log probability and
the most likely alternatives); these functions only reshape them, as plain dicts (the streamed
events are rendered from them without a model round trip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from roundhouse.v1 import inference_pb2


def token_bytes(item: inference_pb2.TokenLogprob | inference_pb2.TopLogprob) -> list[int]:
    """The token's UTF-8 bytes as integers (the token's text encoded when the worker sent none)."""
    return list(item.bytes or item.token.encode())


def chat_entry(item: inference_pb2.TokenLogprob) -> dict[str, Any]:
    """One token of chat's `logprobs.content`."""
    return {
        "token": item.token, "logprob": item.logprob, "bytes": token_bytes(item),
        "top_logprobs": [{"token": top.token, "logprob": top.logprob, "bytes": token_bytes(top)}
                         for top in item.top_logprobs],
    }


def chat_logprobs(items: Sequence[inference_pb2.TokenLogprob]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`: `{"content": [...], "refusal": null}`."""
    return {"content": [chat_entry(item) for item in items], "refusal": None}


def completion_logprobs(items: Sequence[inference_pb2.TokenLogprob], text: str, offset: int = 0) -> dict[str, Any]:
    """A text completion choice's (or chunk's) legacy `logprobs`: the tokens, their log
    probabilities, a dict of the most likely alternatives per position (token text -> log
    probability) and where each token starts in the choice's text. `text` is what these tokens
    became, starting at character `offset` of the choice; a token is found in it after the one
    before (a tokenizer may put spaces between tokens' texts), else placed right after it."""
    offsets, cursor = [], 0
    for item in items:
        found = text.find(item.token, cursor) if item.token else -1
        at = found if found >= 0 else cursor
        offsets.append(offset + at)
        cursor = at + len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [{top.token: top.logprob for top in item.top_logprobs} for item in items],
        "text_offset": offsets,
    }
