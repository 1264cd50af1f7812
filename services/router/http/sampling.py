"""Fields that chat and text completion requests share: the model, sampling and streaming.

Both convert into one `roundhouse.v1.ChatRequest`; `SamplingFields.sampling_proto` fills
everything but the conversation or prompt.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from roundhouse.v1 import inference_pb2
from services.router.http.protocol import OpenAIRequest, StreamOptions

MAX_STOP_SEQUENCES = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingFields(OpenAIRequest):
    """The part of a generation request that chat and completions have in common."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    stop: Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] = []
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _sampling_supported(self) -> SamplingFields:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_proto(self, request_id: str) -> inference_pb2.ChatRequest:
        """A `ChatRequest` with the model, sampling parameters and request id set."""
        request = inference_pb2.ChatRequest(model=self.model, request_id=request_id)
        request.stop.extend(self.stop)
        if self.temperature is not None:
            request.temperature = self.temperature
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.max_tokens is not None:
            request.max_tokens = self.max_tokens
        if self.seed is not None:
            request.seed = self.seed
        return request
