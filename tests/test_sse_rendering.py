"""Streamed events rendered from a pre-rendered envelope are byte for byte the documented
chunk models (`ChatCompletionChunk`, `CompletionResponse`) as JSON, unset delta fields left out."""

from __future__ import annotations

import json

from services.router.http.chat.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    DeltaMessage,
)
from services.router.http.chat.serving import ChatRenderer
from services.router.http.completion.protocol import CompletionChoice, CompletionResponse
from services.router.http.completion.serving import CompletionRenderer
from services.router.http.protocol import UsageInfo


def payload(event: bytes) -> bytes:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return event[len(b"data: "):-2]


def chat_chunk(renderer: ChatRenderer, delta: DeltaMessage | None, reason: str | None = None,
               usage: UsageInfo | None = None) -> bytes:
    """The event as the models render it, `delta` without its unset (None) fields."""
    head = json.loads(payload(renderer.delta("")))
    choices = [] if delta is None else [ChatCompletionChunkChoice(delta=delta, finish_reason=reason)]
    body = ChatCompletionChunk(id=head["id"], created=head["created"], model=head["model"],
                               choices=choices, usage=usage).model_dump()
    if delta is not None:
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def test_chat_events_are_the_chunk_model() -> None:
    renderer = ChatRenderer("remote-chat")
    usage = UsageInfo(prompt_tokens=11, completion_tokens=3, total_tokens=14)
    assert payload(renderer.opening()[0]) == chat_chunk(renderer, DeltaMessage(role="assistant", content=""))
    assert payload(renderer.delta("héllo \"there\"")) == chat_chunk(renderer, DeltaMessage(content="héllo \"there\""))
    assert payload(renderer.finish("length")) == chat_chunk(renderer, DeltaMessage(), "length")
    assert payload(renderer.usage(usage)) == chat_chunk(renderer, None, usage=usage)
    for event in (*renderer.opening(), renderer.delta("x"), renderer.finish("stop"), renderer.usage(usage)):
        ChatCompletionChunk.model_validate_json(payload(event))


def test_completion_events_are_the_response_model() -> None:
    renderer = CompletionRenderer("remote-chat", echo="Say it")
    head = json.loads(payload(renderer.delta("")))

    def rendered(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        body = CompletionResponse(id=head["id"], created=head["created"], model=head["model"],
                                  choices=choices, usage=usage).model_dump()
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    usage = UsageInfo(prompt_tokens=2, completion_tokens=1, total_tokens=3)
    assert payload(renderer.opening()[0]) == rendered([CompletionChoice(text="Say it")])
    assert payload(renderer.delta("raw!")) == rendered([CompletionChoice(text="raw!")])
    assert payload(renderer.finish("stop")) == rendered([CompletionChoice(text="", finish_reason="stop")])
    assert payload(renderer.usage(usage)) == rendered([], usage)
