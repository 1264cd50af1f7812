"""A remote Anthropic Messages API (Claude, or another Roundhouse) as a hosted model.

The HTTP side (key from the environment, scrubbed errors, pooled connections, the upstream
rules checked before the key is read, errors mapped to domain errors) is
`services.common.anthropic_upstream`; the request and the answer's events are translated by
`anthropic_messages`. This adapts them to the model layer: chat streamed as `ChatDelta`s
(text, tool calls as OpenAI streams them, finish reason, usage) and `count_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.common.anthropic_upstream import AnthropicUpstream
from services.common.assetspec import AssetSpec
from services.common.errors import WrongInterface
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.worker.models.anthropic_messages import MessagesStream, conversation, sampling
from services.worker.models.types import LLM, Capabilities, ChatDelta, ChatParams, HostedModel, Phases

__all__ = ["AnthropicRemoteModel"]


class AnthropicRemoteModel(HostedModel):
    """Chats (streamed) with `source.upstream_model` at `source.url`'s `/v1/messages`; the
    asset's `generation` defaults fill what a request leaves unset (`max_tokens` defaults to
    `anthropic_messages.DEFAULT_MAX_TOKENS`, as the Messages API requires one)."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field), then
        prepare the client; the host is resolved (blocking) so a name for a metadata address
        is refused."""
        if list(spec.interface) != [LLM]:
            raise WrongInterface(f"model '{spec.asset_id}': runtime anthropic serves {LLM} only")
        self._upstream = AnthropicUpstream(spec, upstreams=upstreams)
        self._defaults = spec.generation
        self.asset_id = spec.asset_id
        self.interfaces = (LLM,)
        self.upstream_model = self._upstream.model
        self.capabilities = Capabilities.of_upstream(spec.metadata.context_length or 0)

    async def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        body = {"model": self.upstream_model, **sampling(params, self._defaults), **conversation(params)}
        answer = MessagesStream()
        phases = Phases()  # the upstream's phases are its own: only when its pieces came is known here
        async for event in self._upstream.stream(body):
            for delta in answer.feed(event):
                if not phases.first_token_ns:
                    phases.first_token_ns = time.time_ns()
                yield delta
        phases.end_ns = time.time_ns()
        phases.first_token_ns = phases.first_token_ns or phases.end_ns
        last = answer.last()
        yield ChatDelta(last.text, finish_reason=last.finish_reason, usage=last.usage, phases=phases,
                        stop_sequence=last.stop_sequence)

    async def count_tokens(self, params: ChatParams) -> int:
        """Prompt tokens the request would use, as the upstream counts them
        (`/v1/messages/count_tokens`). Raises `InvalidArgument` for messages the Messages API
        cannot take, the upstream's errors as `chat` does."""
        self.check_serving()
        return await self._upstream.count_tokens({"model": self.upstream_model, **conversation(params)})

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._upstream.close()
