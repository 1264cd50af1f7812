"""Domain types of the worker's model layer: what a hosted model offers and answers.

No protobuf here: the gRPC servicer converts these to and from `roundhouse.v1` messages.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotReady, WrongInterface
from services.common.inference_requests import (
    LOGIT_BIAS_MAX,
    LOGIT_BIAS_MIN,
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    PENALTY_MAX,
    PENALTY_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_P_MAX,
    TOP_P_MIN,
    schema_problems,
)

LLM = "llm-runtime"
EMBEDDING = "embedding-runtime"

FinishReason = Literal["stop", "length", "tool_calls"]
ToolCallingMode = Literal["", "template", "constrained", "upstream"]


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
    supports_structured_output: bool = False
    tool_calling: ToolCallingMode = ""

    @classmethod
    def of_upstream(cls, context_length: int, embedding_dim: int = 0) -> Capabilities:
        """What a model served by a remote upstream offers: the upstream decides on tools and
        shapes answers; only the declared sizes are known (nothing can be measured)."""
        return cls(context_length=context_length, embedding_dim=embedding_dim, supports_system_role=True,
                   supports_tools=True, streaming=True, supports_structured_output=True,
                   tool_calling="upstream")


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made (in an earlier turn, or in a response)."""

    id: str
    name: str
    arguments: str
    """The arguments, as JSON text (an object)."""


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant message's tool calls."""
    tool_call_id: str = ""
    """A `tool` message: the call it answers."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call, in OpenAI's function-tool terms."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools[]` entry, also what chat templates expect."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ResponseFormat:
    """The answer's shape: `text`, `json_object` (any JSON object) or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    """`json_schema`: the schema."""
    name: str = ""
    strict: bool = False
    description: str = ""


@dataclass(frozen=True)
class ToolChoice:
    """Which tool the model is to call: `auto`, `none`, `required`, or `function` (`name`)."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str = ""


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias added to its logit."""
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    top_k: int = 0
    """0: no limit."""
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    tool_choice: ToolChoice | None = None
    """None: `auto` when tools are given."""
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        self.messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in self.messages]

    def validate(self) -> None:
        """Raise `InvalidArgument` when the request is malformed; the bounds are those every
        door checks (`services.common.inference_requests`)."""
        if bool(self.messages) == (self.prompt is not None):
            raise InvalidArgument("exactly one of 'messages' and 'prompt' must be given")
        if self.temperature is not None and not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            raise InvalidArgument(f"temperature must be between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g}")
        if self.top_p is not None and not TOP_P_MIN <= self.top_p <= TOP_P_MAX:
            raise InvalidArgument(f"top_p: must be between {TOP_P_MIN:g} and {TOP_P_MAX:g} "
                                  "(0: only the most likely token)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop sequences must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_MIN <= getattr(self, name) <= PENALTY_MAX:
                raise InvalidArgument(f"{name} must be between {PENALTY_MIN:g} and {PENALTY_MAX:g}")
        if any(not LOGIT_BIAS_MIN <= bias <= LOGIT_BIAS_MAX for bias in self.logit_bias.values()):
            raise InvalidArgument(f"logit_bias: every bias must be between {LOGIT_BIAS_MIN:g} and {LOGIT_BIAS_MAX:g}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}")
        if self.top_k < 0:
            raise InvalidArgument("top_k must not be negative")
        if self.response_format.type == "json_schema" and not isinstance(self.response_format.schema, dict):
            raise InvalidArgument("response_format: json_schema needs a schema (a JSON object)")
        response_schema = self.response_format.schema if self.response_format.type == "json_schema" else None
        if problems := schema_problems(response_schema, [t.parameters for t in self.tools]):
            raise InvalidArgument.from_problems(problems)
        choice = self.tool_choice
        if choice is not None and choice.mode in ("required", "function") and not self.tools:
            raise InvalidArgument(f"tool_choice: '{choice.mode}' needs tools")
        if choice is not None and choice.mode == "function" and choice.name not in {t.name for t in self.tools}:
            raise InvalidArgument(f"tool_choice: function {choice.name!r} is not among the tools")
        if self.tools and self.response_format.type != "text" and self.effective_tool_choice != "none":
            raise InvalidArgument("response_format and tool calls cannot be combined; "
                                  "send tool_choice 'none' or leave response_format out")

    @property
    def effective_tool_choice(self) -> str:
        """`none` without tools; else the choice's mode (`auto` when unset)."""
        if not self.tools:
            return "none"
        return self.tool_choice.mode if self.tool_choice is not None else "auto"


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
class ToolCallDelta:
    """A piece of a streamed tool call: the first of a call has `id` and `name`, later ones
    more `arguments` text (OpenAI's streaming)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class TopLogprob:
    """An alternative token at a position."""

    token: str
    logprob: float
    bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability, with the most likely alternatives."""

    token: str
    logprob: float
    bytes: bytes = b""
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ChatDelta:
    """A piece of a streamed completion of choice `index`. Each choice's last delta has its
    `finish_reason` (and `stop_sequence` when one ended it); the stream's very last delta has
    `usage` (all choices) if known, and the request's `phases` where the model measures them."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    phases: Phases | None = None
    index: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_sequence: str = ""


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

    async def count_prompt_tokens(self, params: ChatParams) -> int:
        """The prompt tokens `params` would use (after the chat template, tools included),
        without generating. Raises `WrongInterface` if the model does not chat, `ModelNotReady`
        if it failed, `FailedPrecondition` if it cannot count (a remote upstream without a way
        to count).

        A model counts with its `count_tokens(params)`, plain (run in a thread: templating and
        tokenizing take CPU) or a coroutine function (a remote upstream asked over the network).
        """
        if LLM not in self.interfaces:
            raise WrongInterface(f"model '{self.asset_id}' does not implement {LLM}")
        self.check_serving()
        params.validate()
        count = getattr(self, "count_tokens", None)
        if count is None:
            raise FailedPrecondition(f"model '{self.asset_id}' cannot count tokens")
        if inspect.iscoroutinefunction(count):
            return int(await count(params))
        return int(await asyncio.to_thread(count, params))

    def _chat(self, params: ChatParams) -> AsyncIterator[ChatDelta]:
        raise WrongInterface(f"model '{self.asset_id}' does not implement {LLM}")

    async def _embed(self, inputs: list[EmbedInput]) -> EmbedResult:
        raise WrongInterface(f"model '{self.asset_id}' does not implement {EMBEDDING}")

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving and release what the model holds."""
