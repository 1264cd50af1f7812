"""Domain types of the worker's model layer: what a hosted model offers and answers.

No protobuf here: the gRPC servicer converts these to and from `roundhouse.v1` messages.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.common.errors import InvalidArgument, ModelNotReady, WrongInterface

LLM = "llm-runtime"
EMBEDDING = "embedding-runtime"

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Capabilities:
    """Facts measured when the model was loaded (mirrors `roundhouse.v1.Capabilities`)."""

    context_length: int = 0
    embedding_dim: int = 0
    supports_system_role: bool = False
    supports_tools: bool = False
    parameter_count: int = 0
    memory_bytes: int = 0
    streaming: bool = False


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str
    name: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call, in OpenAI's function-tool terms."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools[]` entry, also what chat templates expect."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass
class ChatParams:
    """A chat or raw completion request. Exactly one of `messages` and `prompt` is set.

    Dict messages (`{"role", "content", "name"}`) are accepted and turned into `ChatMessage`.
    """

    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    tools: list[Tool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in self.messages]

    def validate(self) -> None:
        """Raise `InvalidArgument` when the request is malformed."""
        if bool(self.messages) == (self.prompt is not None):
            raise InvalidArgument("exactly one of 'messages' and 'prompt' must be given")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise InvalidArgument("temperature must be between 0 and 2")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise InvalidArgument("top_p: must be between 0 and 1 (0: only the most likely token)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop sequences must not be empty")


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Phases:
    """When one chat request's phases ran in its model, in nanoseconds since the epoch (as spans
    take them); 0: not reached, or not known for this model.

    The chat engine fills them in from its thread as the request goes through its batch: the
    prefill of its prompt begins, its first token is drawn, its last one is. A remote model
    knows only when its first and last pieces came.
    """

    prefill_start_ns: int = 0
    first_token_ns: int = 0
    end_ns: int = 0


@dataclass(frozen=True)
class ChatDelta:
    """A piece of a streamed completion; the last one has `finish_reason` (and usage if known,
    and the request's `phases` where the model measures them)."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    phases: Phases | None = None


@dataclass(frozen=True)
class EmbedResult:
    """One vector per input, in input order."""

    vectors: list[list[float]] | np.ndarray
    prompt_tokens: int
    dimensions: int


EmbedInput = str | Sequence[int]

FailureCallback = Callable[[str], None]
"""Told the reason once a hosted model fails (see `HostedModel.on_failure`)."""

PassCallback = Callable[[int], None]
"""Told the number of inputs of each forward pass of a batching model (see
`HostedModel.on_forward_pass`)."""


def failed_model_error(asset_id: str, reason: str) -> ModelNotReady:
    """The error of a request to (or running on) a model whose engine failed."""
    return ModelNotReady(f"model '{asset_id}' failed on this worker ({reason}); it is being reloaded, retry shortly")


class HostedModel(abc.ABC):
    """A model a worker holds: chat and/or embed, depending on its interfaces.

    A model can fail while held (its engine dies): from then on `failure` says why, it
    serves nothing more (its requests raise `ModelNotReady`), and the callback given to
    `on_failure` is told, so its holder can drop it.
    """

    asset_id: str
    capabilities: Capabilities
    interfaces: tuple[str, ...]
    failure: str | None = None
    """Why the model failed; None while it can serve."""
    _failure_callback: FailureCallback | None = None

    def on_failure(self, callback: FailureCallback) -> None:
        """Call `callback(reason)` on the event loop once the model fails; call on the loop.

        Models with an engine that can die watch it from here on; if the model failed
        already, the call comes at the loop's next turn.
        """
        self._failure_callback = callback
        if self.failure is not None:
            asyncio.get_running_loop().call_soon(callback, self.failure)

    def on_forward_pass(self, callback: PassCallback) -> None:
        """Call `callback(inputs)` after every forward pass that batches requests' inputs (an
        embedding model's), from the thread that ran it; a model without one ignores it."""
        return None

    def _mark_failed(self, reason: str) -> None:
        """Record the failure and tell the holder; call on the event loop, once."""
        if self.failure is not None:
            return
        self.failure = reason
        if self._failure_callback is not None:
            self._failure_callback(reason)

    def check_serving(self) -> None:
        """Raise `ModelNotReady` if the model failed."""
        if self.failure is not None:
            raise failed_model_error(self.asset_id, self.failure)

    def chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        """Stream a completion. Raises `WrongInterface` at once if the model does not chat,
        `ModelNotReady` if it failed.

        Request errors (`InvalidArgument`, `ContextLengthExceeded`) are raised on the first
        iteration, before any delta. Closing the iterator or cancelling its task stops
        generation.
        """
        if LLM not in self.interfaces:
            raise WrongInterface(f"model '{self.asset_id}' does not implement {LLM}")
        self.check_serving()
        params.validate()
        return self._chat(params)

    async def embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        """Embed texts or token-id arrays. Raises `WrongInterface` if the model does not embed,
        `ModelNotReady` if it failed."""
        if EMBEDDING not in self.interfaces:
            raise WrongInterface(f"model '{self.asset_id}' does not implement {EMBEDDING}")
        self.check_serving()
        if not inputs:
            raise InvalidArgument("at least one input is required")
        return await self._embed(inputs)

    def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        raise WrongInterface(f"model '{self.asset_id}' does not implement {LLM}")

    async def _embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        raise WrongInterface(f"model '{self.asset_id}' does not implement {EMBEDDING}")

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving and release what the model holds."""
