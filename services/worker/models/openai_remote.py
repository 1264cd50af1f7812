"""A remote OpenAI-compatible upstream (Ollama, vLLM, LM Studio, a cloud API) as a hosted model.

The HTTP side (key from the environment, scrubbed errors, pooled connections, the upstream
rules checked before the key is read) is `services.common.openai_upstream`, which the router
uses too when it calls the upstream itself; this adapts it to the model layer's types.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.common.assetspec import AssetSpec
from services.common.errors import FailedPrecondition, UpstreamError
from services.common.openai_chat import ChatOptions, chat_body, top_k_refusal
from services.common.openai_upstream import OpenAIUpstream
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.worker.models.types import (
    Capabilities,
    ChatDelta,
    ChatParams,
    EmbedInput,
    EmbedResult,
    HostedModel,
    Phases,
    ToolCallDelta,
    Usage,
)
from services.worker.models.upstream_shapes import (
    openai_message,
    openai_response_format,
    openai_tool,
    openai_tool_choice,
    token_logprob,
)

__all__ = ["OpenAIRemoteModel", "UpstreamHTTPError"]

UpstreamHTTPError = UpstreamError
"""What a failed upstream raises: an `UpstreamError` itself (see `openai_upstream`); the name
stays for `services.worker.models`, which exports it."""


class OpenAIRemoteModel(HostedModel):
    """Proxies chat (streamed) and embeddings to `source.url`, under `source.upstream_model`."""

    def __init__(self, spec: AssetSpec, *, upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES) -> None:
        """Check the upstream against `upstreams` (`InvalidSpec` naming the field), then
        prepare the client; the host is resolved (blocking) so a name for a metadata address
        is refused."""
        self._upstream = OpenAIUpstream(spec, upstreams=upstreams)
        self.asset_id = spec.asset_id
        self.interfaces = tuple(spec.interface)
        self.upstream_model = self._upstream.model
        self.capabilities = Capabilities.of_upstream(spec.metadata.context_length or 0,
                                                     spec.metadata.embedding_dim or 0)

    async def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        path, body = chat_body(
            self.upstream_model,
            messages=[openai_message(m) for m in params.messages],
            prompt=params.prompt, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_tokens, seed=params.seed, stop=params.stop,
            tools=[openai_tool(t) for t in params.tools], stream=True, options=self._options(params),
        )
        phases = Phases()  # the upstream's phases are its own: only when its pieces came is known here
        async for piece in self._upstream.stream(path, body):
            if not phases.first_token_ns:
                phases.first_token_ns = time.time_ns()
            usage = piece.usage
            ending = piece.finish_reason is not None or usage is not None
            if ending:
                phases.end_ns = time.time_ns()
            yield ChatDelta(
                piece.text, finish_reason=piece.finish_reason,
                usage=Usage(usage.prompt_tokens, usage.completion_tokens) if usage else None,
                phases=phases if ending else None, index=piece.index,
                tool_calls=tuple(ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in piece.tool_calls),
                logprobs=tuple(token_logprob(p) for p in piece.logprobs),
            )

    def _options(self, params: ChatParams) -> ChatOptions:
        """The request's other fields, as the upstream takes them; `top_k` is not OpenAI's."""
        if params.top_k:
            raise top_k_refusal(self.asset_id)
        return ChatOptions(
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias, logprobs=params.logprobs, top_logprobs=params.top_logprobs,
            n=params.n, response_format=openai_response_format(params.response_format),
            tool_choice=openai_tool_choice(params.tool_choice),
            parallel_tool_calls=params.parallel_tool_calls,
        )

    def count_tokens(self, params: ChatParams) -> int:
        """Refused: an OpenAI-compatible API has no way to count a prompt's tokens."""
        raise FailedPrecondition(f"model '{self.asset_id}' is served by an OpenAI-compatible upstream, "
                                 "which cannot count tokens without generating")

    async def _embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        vectors, tokens = await self._upstream.embed(inputs)
        return EmbedResult(vectors=vectors, prompt_tokens=tokens, dimensions=len(vectors[0]))

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._upstream.close()
