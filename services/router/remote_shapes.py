"""A `roundhouse.v1.ChatRequest` as an OpenAI-compatible upstream takes it, and the upstream's
answer as the `ChatChunk`s a worker would send: what the router's direct path to a remote
(`runtime: openai`) asset sends and relays.

Everything a request carries passes through: the conversation with earlier tool calls and
tool results, tools (strict when asked), penalties, logit biases, logprobs, choices, the
answer's format, the tool choice. The answer comes back per choice, with its tool-call pieces
and logprobs. `top_k`, which OpenAI's API does not take, is refused.
"""

from __future__ import annotations

import json
from typing import Any

from roundhouse.v1 import inference_pb2
from services.common.errors import FieldProblem, InvalidArgument
from services.common.openai_answer import UpstreamText
from services.common.openai_chat import (
    ChatOptions,
    chat_body,
    message_entry,
    response_format_entry,
    tool_choice_entry,
    tool_entry,
    top_k_refusal,
)

FINISH = {"stop": inference_pb2.FINISH_REASON_STOP, "length": inference_pb2.FINISH_REASON_LENGTH,
          "tool_calls": inference_pb2.FINISH_REASON_TOOL_CALLS}
SCHEMA_FIELD = "response_format.json_schema.schema"


def request_body(model: str, request: inference_pb2.ChatRequest, *, stream: bool,
                 asset_id: str = "") -> tuple[str, dict[str, Any]]:
    """The upstream path and body of a `ChatRequest` (see `openai_upstream.chat_body`); JSON
    text that is not a JSON object (tool parameters, a response schema) is an `InvalidArgument`
    naming the field."""
    if request.HasField("top_k") and request.top_k:
        raise top_k_refusal(asset_id or model)
    return chat_body(
        model,
        messages=[_message(m) for m in request.messages],
        prompt=request.prompt if not request.messages else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        seed=request.seed if request.HasField("seed") else None,
        stop=request.stop,
        tools=[_tool(t) for t in request.tools],
        stream=stream,
        options=_options(request),
    )


def _message(message: inference_pb2.ChatMessage) -> dict[str, Any]:
    return message_entry(message.role, message.content, name=message.name,
                         tool_calls=[(c.id, c.name, c.arguments) for c in message.tool_calls],
                         tool_call_id=message.tool_call_id)


def _tool(tool: inference_pb2.Tool) -> dict[str, Any]:
    """A `Tool` as OpenAI's `tools[]` entry; parameters that are not JSON are refused."""
    try:
        parameters = json.loads(tool.parameters_json) if tool.parameters_json else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"tools: parameters of '{tool.name}' are not JSON: {exc}") from None
    return tool_entry(tool.name, tool.description, parameters, strict=tool.strict)


def _options(request: inference_pb2.ChatRequest) -> ChatOptions:
    """The request's fields beyond the basics, as OpenAI takes them."""
    response_format: dict[str, Any] | None = None
    if request.HasField("response_format"):
        shape = request.response_format
        schema = _schema(shape.schema_json) if shape.type == "json_schema" else None
        response_format = response_format_entry(shape.type, schema=schema, name=shape.name, strict=shape.strict,
                                                description=shape.description)
    choice = request.tool_choice
    return ChatOptions(
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logit_bias=dict(request.logit_bias), logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        n=request.n or 1, response_format=response_format,
        tool_choice=tool_choice_entry(choice.mode, choice.function_name) if request.HasField("tool_choice") else None,
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
    )


def _schema(text: str) -> dict[str, Any]:
    """A response format's JSON Schema text as an object (none: `{}`); `InvalidArgument` naming
    `response_format.json_schema.schema` when it is not a JSON object."""
    try:
        schema = json.loads(text or "{}")
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the stack
        raise InvalidArgument.from_problems([FieldProblem(SCHEMA_FIELD, f"not JSON: {exc}")]) from None
    if not isinstance(schema, dict):
        raise InvalidArgument.from_problems([FieldProblem(SCHEMA_FIELD, "must be a JSON object")])
    return schema


def to_chunk(piece: UpstreamText, asset_id: str) -> inference_pb2.ChatChunk:
    """An upstream piece as the `ChatChunk` a worker would send: its choice, text, tool-call
    pieces, logprobs, and on a choice's last piece its finish reason (the usage on the
    answer's last)."""
    chunk = inference_pb2.ChatChunk(delta=piece.text, asset_id=asset_id, index=piece.index)
    if piece.finish_reason is not None:
        chunk.finish_reason = FINISH[piece.finish_reason]
    chunk.tool_calls.extend(inference_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
                            for c in piece.tool_calls)
    chunk.logprobs.extend(
        inference_pb2.TokenLogprob(token=p.token, logprob=p.logprob, bytes=p.utf8, top_logprobs=[
            inference_pb2.TopLogprob(token=t, logprob=lp, bytes=raw) for t, lp, raw in p.top])
        for p in piece.logprobs)
    if piece.usage is not None:
        usage = chunk.usage
        usage.prompt_tokens, usage.completion_tokens = piece.usage.prompt_tokens, piece.usage.completion_tokens
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return chunk
