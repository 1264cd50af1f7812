"""The Ollama API's request bodies, each converting itself to what the gateway takes.

Unknown top-level fields are ignored, as Ollama ignores them; fields Ollama defines that
Roundhouse does not implement (`images`, `suffix`, `template`, `context`, `think`,
`truncate: true`) are refused with a 400 naming them when they would change the answer, and
so is `system` with `raw: true` (a raw prompt has no template to place it in).
Model names may carry Ollama's default tag (`tiny-chat:latest` is `tiny-chat`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from roundhouse.v1 import inference_pb2
from services.common.inference_requests import FUNCTION_NAME, MAX_NAME_CHARS, MAX_TOP_LOGPROBS
from services.router.http.errors import UNSUPPORTED
from services.router.http.ollama.options import Options, keep_alive_seconds, parse_options, response_format

DEFAULT_TAG = ":latest"


def model_name(value: Any) -> Any:
    """A model name without Ollama's default tag."""
    return value.removesuffix(DEFAULT_TAG) if isinstance(value, str) else value


ModelName = Annotated[str, BeforeValidator(model_name), Field(min_length=1, max_length=MAX_NAME_CHARS)]


def _unsupported(field: str, hint: str) -> PydanticCustomError:
    return PydanticCustomError(UNSUPPORTED, "{field}: not implemented by Roundhouse; {hint}",
                               {"field": field, "hint": hint})


class OllamaBody(BaseModel):
    """Base of every request body: unknown fields are ignored, as Ollama does."""

    model_config = ConfigDict(extra="ignore")


class NamedModel(OllamaBody):
    """A body naming one model, as `model` or (older clients) `name`."""

    model: ModelName

    @model_validator(mode="before")
    @classmethod
    def _name_or_model(cls, value: Any) -> Any:
        if isinstance(value, dict) and "model" not in value and "name" in value:
            return {**value, "model": value["name"]}
        return value


class PullBody(NamedModel):
    """`POST /api/pull`."""

    stream: bool = True
    insecure: bool | None = None


class GenerationBody(NamedModel):
    """What chat and generate share: sampling options, output format, streaming, keep-alive."""

    options: Annotated[Options | None, BeforeValidator(parse_options)] = None
    format: Annotated[inference_pb2.ResponseFormat | None, BeforeValidator(response_format)] = None
    stream: bool = True
    keep_alive: Annotated[float | None, BeforeValidator(keep_alive_seconds)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    think: bool | str | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @field_validator("think")
    @classmethod
    def _no_thinking(cls, value: Any) -> Any:
        if value not in (None, False):
            raise _unsupported("think", "leave it out or send false")
        return value

    def sampling(self, request: inference_pb2.ChatRequest, context_length: int) -> inference_pb2.ChatRequest:
        """`request` with the options, format and log probabilities set."""
        if self.options is not None:
            self.options.apply(request, context_length)
        if self.format is not None:
            request.response_format.CopyFrom(self.format)
        if self.logprobs or self.top_logprobs:
            request.logprobs = True
            request.top_logprobs = self.top_logprobs
        return request


class FunctionCall(OllamaBody):
    """A call an assistant made in an earlier turn."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(OllamaBody):
    """An assistant's tool call: `{"function": {"name", "arguments"}}`."""

    id: str | None = None
    function: FunctionCall

    def to_proto(self) -> inference_pb2.ToolCall:
        """The call as the worker takes it (arguments as JSON text)."""
        arguments = self.function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return inference_pb2.ToolCall(id=self.id or "", name=self.function.name, arguments=text)


class Message(OllamaBody):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None

    @field_validator("images")
    @classmethod
    def _no_images(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise _unsupported("images", "the models Roundhouse serves take text only")
        return value

    def to_proto(self) -> inference_pb2.ChatMessage:
        """The message as the worker takes it (a tool result names its tool)."""
        return inference_pb2.ChatMessage(
            role=self.role, content=self.content, name=self.tool_name or "",
            tool_calls=[c.to_proto() for c in self.tool_calls or []],
            tool_call_id=self.tool_call_id or "")


class Function(OllamaBody):
    """A function the model may call."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(OllamaBody):
    """A tool offered to the model; only function tools exist."""

    type: Literal["function"] = "function"
    function: Function

    def to_proto(self) -> inference_pb2.Tool:
        """The tool as the worker takes it."""
        fn = self.function
        return inference_pb2.Tool(name=fn.name, description=fn.description or "",
                                  parameters_json=json.dumps(fn.parameters) if fn.parameters else "")


class ChatBody(GenerationBody):
    """`POST /api/chat`."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    def to_proto(self, request_id: str, context_length: int) -> inference_pb2.ChatRequest:
        """The request as the gateway takes it."""
        request = inference_pb2.ChatRequest(model=self.model, request_id=request_id)
        request.messages.extend(m.to_proto() for m in self.messages)
        request.tools.extend(t.to_proto() for t in self.tools or [])
        return self.sampling(request, context_length)


class GenerateBody(GenerationBody):
    """`POST /api/generate`: a prompt, with the chat template unless `raw`."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[Any] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None

    @model_validator(mode="after")
    def _implemented(self) -> GenerateBody:
        if self.images:
            raise _unsupported("images", "the models Roundhouse serves take text only")
        if self.suffix:
            raise _unsupported("suffix", "fill-in-the-middle is not available; leave it out")
        if self.template:
            raise _unsupported("template", "the model's own chat template is used; send raw: true "
                                           "with a prompt you formatted yourself")
        if self.context:
            raise _unsupported("context", "send the conversation to /api/chat instead")
        if self.raw and self.system:
            raise ValueError("system: cannot be used with raw: true (a raw prompt is sent as it is, "
                             "without the chat template that would place a system prompt); put it in "
                             "the prompt or leave raw out")
        return self

    @property
    def load_only(self) -> bool:
        """No prompt: the request only loads (or, with keep_alive 0, unloads) the model."""
        return not self.prompt

    def to_proto(self, request_id: str, context_length: int) -> inference_pb2.ChatRequest:
        """The request as the gateway takes it: a raw prompt, or a user turn (after `system`)."""
        request = inference_pb2.ChatRequest(model=self.model, request_id=request_id)
        if self.raw:
            request.prompt = self.prompt
        else:
            if self.system:
                request.messages.append(inference_pb2.ChatMessage(role="system", content=self.system))
            request.messages.append(inference_pb2.ChatMessage(role="user", content=self.prompt))
        return self.sampling(request, context_length)


class EmbedBody(NamedModel):
    """`POST /api/embed`. Of the options only `num_ctx` applies (checked against the model's
    context length when served); any other is refused naming it."""

    input: str | list[str]
    truncate: bool | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    options: Annotated[Options | None, BeforeValidator(parse_options)] = None
    keep_alive: Annotated[float | None, BeforeValidator(keep_alive_seconds)] = None

    @field_validator("truncate")
    @classmethod
    def _no_truncation(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("truncate", "an input beyond the model's context is refused; "
                                           "leave it out or send false")
        return value

    @field_validator("options")
    @classmethod
    def _no_sampling(cls, value: Options | None) -> Options | None:
        if value is not None and value.model_fields_set - {"num_ctx"}:
            name = sorted(value.model_fields_set - {"num_ctx"})[0]
            raise PydanticCustomError(UNSUPPORTED, "options.{name}: does not apply to embeddings; "
                                      "leave it out", {"name": name})
        return value

    @property
    def inputs(self) -> list[str]:
        """The texts to embed, in order."""
        return [self.input] if isinstance(self.input, str) else self.input

    def to_proto(self, request_id: str) -> inference_pb2.EmbedRequest:
        """The request as the gateway takes it."""
        return inference_pb2.EmbedRequest(
            model=self.model, request_id=request_id,
            inputs=[inference_pb2.EmbedInput(text=text) for text in self.inputs])


class EmbeddingsBody(NamedModel):
    """`POST /api/embeddings` (Ollama's older endpoint): one prompt, one vector."""

    prompt: str
    options: Annotated[Options | None, BeforeValidator(parse_options)] = None
    keep_alive: Annotated[float | None, BeforeValidator(keep_alive_seconds)] = None

    def embed(self) -> EmbedBody:
        """The same request as `/api/embed` takes it."""
        return EmbedBody.model_validate({
            "model": self.model, "input": self.prompt, "keep_alive": self.keep_alive,
            "options": self.options.model_dump(exclude_unset=True) if self.options else None})
