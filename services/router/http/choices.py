"""The choices of one answer, assembled from the gateway's chunks.

A worker streams every choice of a request on one stream: each chunk names its choice
(`index`) and carries text, pieces of tool calls, or the log probabilities of its tokens; each
choice ends with a chunk carrying its finish reason, and the stream's last chunk carries the
usage of all of them. `Answer` collects a whole (non-streamed) answer; `Finishes` keeps track,
while streaming, of which choices still owe their finish event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roundhouse.v1 import inference_pb2
from services.common.errors import UpstreamError
from services.router.http.protocol import FinishReason, UsageInfo, finish_reason


@dataclass
class CallParts:
    """One tool call of a choice, as its pieces arrive."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class ChoiceParts:
    """One choice of a whole answer: its text, tool calls, log probabilities and ending."""

    index: int
    text: list[str] = field(default_factory=list)
    calls: dict[int, CallParts] = field(default_factory=dict)
    logprobs: list[inference_pb2.TokenLogprob] = field(default_factory=list)
    reason: int = inference_pb2.FINISH_REASON_UNSPECIFIED
    stop_sequence: str = ""

    def add(self, chunk: inference_pb2.ChatChunk) -> None:
        """Take what `chunk` adds to this choice."""
        if chunk.delta:
            self.text.append(chunk.delta)
        for piece in chunk.tool_calls:
            call = self.calls.setdefault(piece.index, CallParts())
            call.id = call.id or piece.id
            call.name = call.name or piece.name
            call.arguments.append(piece.arguments)
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            self.reason = chunk.finish_reason
            self.stop_sequence = chunk.stop_sequence

    @property
    def content(self) -> str:
        """The choice's text."""
        return "".join(self.text)

    def tool_calls(self) -> list[CallParts]:
        """The choice's tool calls, in order."""
        return [self.calls[i] for i in sorted(self.calls)]

    def finish(self, fallback: int) -> FinishReason:
        """OpenAI's finish reason: the choice's own, else `fallback` (the stream's last)."""
        return finish_reason(self.reason or fallback)


class Answer:
    """A whole answer: every choice, and the stream's last chunk (usage, asset, revision)."""

    def __init__(self, choices: int) -> None:
        self.choices = [ChoiceParts(i) for i in range(choices)]
        self.last: inference_pb2.ChatChunk | None = None

    def add(self, chunk: inference_pb2.ChatChunk) -> None:
        """Take one chunk of the stream. A chunk naming a choice the request did not ask for
        is the worker's error."""
        if chunk.index >= len(self.choices):
            raise UpstreamError(f"the model answered choice {chunk.index} of {len(self.choices)}")
        self.choices[chunk.index].add(chunk)
        self.last = chunk

    def ended(self) -> inference_pb2.ChatChunk:
        """The stream's last chunk; `UpstreamError` when there was none."""
        if self.last is None:
            raise UpstreamError("The model returned no output.")
        return self.last

    @property
    def usage(self) -> UsageInfo:
        """The usage the last chunk reports (all choices)."""
        return UsageInfo.from_proto(self.ended().usage)


class Finishes:
    """Which choices of a stream have had their finish event."""

    def __init__(self, choices: int) -> None:
        self.open = set(range(choices))
        self.last_reason = inference_pb2.FINISH_REASON_UNSPECIFIED

    def finished(self, chunk: inference_pb2.ChatChunk) -> bool:
        """Whether `chunk` ends its choice (the first time it does)."""
        if not chunk.finish_reason or chunk.index not in self.open:
            return False
        self.open.discard(chunk.index)
        self.last_reason = chunk.finish_reason
        return True

    def unfinished(self, last: inference_pb2.ChatChunk) -> list[tuple[int, FinishReason]]:
        """The choices the stream ended without a finish chunk for, with the stream's reason
        (that of its last chunk, else of the last choice that finished)."""
        reason = finish_reason(last.finish_reason or self.last_reason)
        return [(index, reason) for index in sorted(self.open)]
