"""Streamed events rendered from a pre-rendered envelope are byte for byte the documented
chunk models (`ChatCompletionChunk`, `CompletionResponse`) as JSON, unset delta fields left out:
each choice's opening as OpenAI's (its role with content "" before text, with content null on its
first tool call), text, tool-call pieces, log probabilities and each choice's finish."""

from __future__ import annotations

import json

from roundhouse.v1 import inference_pb2
from services.router.http.chat.responses import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChoiceLogprobs,
    DeltaMessage,
    FunctionDelta,
    ToolCallDeltaOut,
)
from services.router.http.chat.serving import ChatRenderer
from services.router.http.completion.protocol import CompletionChoice, CompletionLogprobs, CompletionResponse
from services.router.http.completion.serving import CompletionRenderer
from services.router.http.protocol import FinishReason, UsageInfo

LOGPROB = inference_pb2.TokenLogprob(token="hé", logprob=-0.5, bytes="hé".encode(), top_logprobs=[
    inference_pb2.TopLogprob(token="hé", logprob=-0.5, bytes="hé".encode()),
    inference_pb2.TopLogprob(token="ho", logprob=-1.5)])


def payload(event: bytes | None) -> bytes:
    assert event is not None and event.startswith(b"data: ") and event.endswith(b"\n\n")
    return event[len(b"data: "):-2]


def chat_chunk(renderer: ChatRenderer, delta: DeltaMessage | None, reason: FinishReason | None = None,
               usage: UsageInfo | None = None, index: int = 0,
               logprobs: ChoiceLogprobs | None = None, nulls: tuple[str, ...] = ()) -> bytes:
    """The event as the models render it, `delta` without its unset (None) fields but those
    named in `nulls`, sent as nulls."""
    head = json.loads(payload(renderer.usage(UsageInfo())))
    choices = [] if delta is None else [
        ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)]
    body = ChatCompletionChunk(id=head["id"], created=head["created"], model=head["model"],
                               choices=choices, usage=usage).model_dump()
    if delta is not None:
        body["choices"][0]["delta"] = {k: v for k, v in body["choices"][0]["delta"].items()
                                       if v is not None or k in nulls}
        for call in body["choices"][0]["delta"].get("tool_calls") or []:
            for name in [k for k, v in call.items() if v is None]:
                del call[name]
            call["function"] = {k: v for k, v in call["function"].items() if v is not None}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def opening(renderer: ChatRenderer, index: int = 0) -> bytes:
    """A choice's first event when it starts with text: the role, content "", refusal null."""
    return chat_chunk(renderer, DeltaMessage(role="assistant", content=""), index=index, nulls=("refusal",))


def events(rendered: bytes | None) -> list[bytes]:
    """The payloads of the events in `rendered`."""
    assert rendered is not None
    return [payload(e + b"\n\n") for e in rendered.split(b"\n\n")[:-1]]


def test_chat_events_are_the_chunk_model() -> None:
    renderer = ChatRenderer("remote-chat")
    usage = UsageInfo(prompt_tokens=11, completion_tokens=3, total_tokens=14)
    text = inference_pb2.ChatChunk(delta="héllo \"there\"")
    more = inference_pb2.ChatChunk(delta="!")
    assert renderer.opening(2) == []
    assert events(renderer.piece(text)) == [opening(renderer),
                                            chat_chunk(renderer, DeltaMessage(content="héllo \"there\""))]
    assert events(renderer.piece(more)) == [chat_chunk(renderer, DeltaMessage(content="!"))]
    # A choice that ends before anything was generated still says its role first.
    assert events(renderer.finish(1, "length")) == [opening(renderer, 1),
                                                   chat_chunk(renderer, DeltaMessage(), "length", index=1)]
    assert events(renderer.finish(0, "stop")) == [chat_chunk(renderer, DeltaMessage(), "stop")]
    assert payload(renderer.usage(usage)) == chat_chunk(renderer, None, usage=usage)
    assert renderer.piece(inference_pb2.ChatChunk(index=1)) is None
    fresh = ChatRenderer("remote-chat")
    for rendered in (fresh.piece(text), fresh.finish(0, "tool_calls"), fresh.usage(usage)):
        for event in events(rendered):
            ChatCompletionChunk.model_validate_json(event)


def test_tool_call_pieces_stream_as_openai_streams_them() -> None:
    renderer = ChatRenderer("m")
    first = inference_pb2.ChatChunk(index=1, tool_calls=[
        inference_pb2.ToolCallDelta(index=0, id="call_x", name="lookup", arguments="")])
    later = inference_pb2.ChatChunk(index=1, tool_calls=[inference_pb2.ToolCallDelta(index=0, arguments='{"q": 1')])
    # The choice opens with its first call's first piece: role, content null, refusal null.
    assert events(renderer.piece(first)) == [chat_chunk(renderer, DeltaMessage(role="assistant", tool_calls=[
        ToolCallDeltaOut(index=0, id="call_x", type="function", function=FunctionDelta(name="lookup", arguments=""))]),
        index=1, nulls=("content", "refusal"))]
    # Once open, a call's first piece is its own: no role again.
    assert json.loads(events(renderer.piece(first))[0])["choices"][0]["delta"] == {"tool_calls": [
        {"index": 0, "id": "call_x", "type": "function", "function": {"name": "lookup", "arguments": ""}}]}
    assert events(renderer.piece(later)) == [chat_chunk(renderer, DeltaMessage(tool_calls=[ToolCallDeltaOut(
        index=0, function=FunctionDelta(arguments='{"q": 1'))]), index=1)]
    both = inference_pb2.ChatChunk(tool_calls=[*first.tool_calls, *later.tool_calls], logprobs=[LOGPROB])
    deltas = [json.loads(e)["choices"][0] for e in events(renderer.piece(both))]
    assert [d["delta"]["tool_calls"][0].get("id") for d in deltas] == ["call_x", None]
    assert [d["delta"].get("role") for d in deltas] == ["assistant", None]
    assert [d["logprobs"] is None for d in deltas] == [True, False]


def test_chat_logprobs_ride_on_their_chunk() -> None:
    renderer = ChatRenderer("m")
    [role, event] = events(renderer.piece(inference_pb2.ChatChunk(delta="hé", logprobs=[LOGPROB])))
    assert role == opening(renderer)
    expected = ChoiceLogprobs.model_validate({"content": [{
        "token": "hé", "logprob": -0.5, "bytes": list("hé".encode()),
        "top_logprobs": [{"token": "hé", "logprob": -0.5, "bytes": list("hé".encode())},
                         {"token": "ho", "logprob": -1.5, "bytes": list(b"ho")}]}]})
    assert event == chat_chunk(renderer, DeltaMessage(content="hé"), logprobs=expected)


def test_completion_events_are_the_response_model() -> None:
    renderer = CompletionRenderer("remote-chat", echo="Say it")
    head = json.loads(payload(renderer.usage(UsageInfo())))

    def rendered(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        body = CompletionResponse(id=head["id"], created=head["created"], model=head["model"],
                                  choices=choices, usage=usage).model_dump()
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    usage = UsageInfo(prompt_tokens=2, completion_tokens=1, total_tokens=3)
    assert [payload(e) for e in renderer.opening(2)] == [
        rendered([CompletionChoice(index=i, text="Say it")]) for i in (0, 1)]
    assert payload(renderer.piece(inference_pb2.ChatChunk(delta="raw!"))) == rendered([CompletionChoice(text="raw!")])
    assert payload(renderer.finish(1, "stop")) == rendered([CompletionChoice(index=1, text="", finish_reason="stop")])
    assert payload(renderer.usage(usage)) == rendered([], usage)


def test_completion_logprobs_count_offsets_from_the_echo() -> None:
    renderer = CompletionRenderer("m", echo="ab")
    renderer.piece(inference_pb2.ChatChunk(delta="xyz"))
    event = renderer.piece(inference_pb2.ChatChunk(delta="hé", logprobs=[LOGPROB]))
    logprobs = CompletionLogprobs(tokens=["hé"], token_logprobs=[-0.5], top_logprobs=[{"hé": -0.5, "ho": -1.5}],
                                  text_offset=[5])
    assert json.loads(payload(event))["choices"][0]["logprobs"] == logprobs.model_dump()
