"""Worker messages ⇄ the model layer's domain types."""

from __future__ import annotations

import json
import math
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from roundhouse.v1 import asset_pb2, events_pb2, inference_pb2, worker_pb2
from services.common.asset_proto import timestamp
from services.common.errors import FieldProblem, InvalidArgument
from services.common.events import new_event
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY
from services.worker.holdings import FailedModelInfo, LoadedModelInfo, WorkerState
from services.worker.models import Capabilities, ChatDelta, ChatMessage, ChatParams, EmbedInput, EmbedResult, Tool
from services.worker.models.types import ResponseFormat, TokenLogprob, ToolCall, ToolChoice

FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "tool_calls": inference_pb2.FINISH_REASON_TOOL_CALLS,
}
ResponseFormatType = Literal["text", "json_object", "json_schema"]
ToolChoiceMode = Literal["auto", "none", "required", "function"]
RESPONSE_FORMATS: tuple[ResponseFormatType, ...] = get_args(ResponseFormatType)
TOOL_CHOICES: tuple[ToolChoiceMode, ...] = get_args(ToolChoiceMode)
Name = TypeVar("Name", bound=str)


def queue_timeout(sent: str | bytes | None) -> float | None:
    """The wait for a slot the `QUEUE_TIMEOUT_KEY` metadata allows; None when it is absent."""
    if sent is None:
        return None
    text = sent.decode(errors="replace") if isinstance(sent, bytes) else sent
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgument(f"{QUEUE_TIMEOUT_KEY}: must be a number of seconds, 0 or more; got {text!r}")
    return seconds


def chat_params(request: inference_pb2.ChatRequest) -> ChatParams:
    """A `ChatRequest` as the model layer's parameters; JSON text that is not JSON (tool
    parameters, a response schema) is refused naming the field. Unset fields take the model
    layer's defaults: no penalties, one choice, parallel tool calls allowed."""
    return ChatParams(
        messages=[_message(m) for m in request.messages],
        prompt=request.prompt if not request.messages else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        tools=[_tool(n, t) for n, t in enumerate(request.tools)],
        presence_penalty=request.presence_penalty if request.HasField("presence_penalty") else 0.0,
        frequency_penalty=request.frequency_penalty if request.HasField("frequency_penalty") else 0.0,
        logit_bias={int(token): bias for token, bias in request.logit_bias.items()},
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        n=request.n or 1,
        top_k=request.top_k if request.HasField("top_k") else 0,
        response_format=_response_format(request),
        tool_choice=_tool_choice(request),
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
    )


def _message(message: inference_pb2.ChatMessage) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls)
    return ChatMessage(message.role, message.content, message.name, tool_calls=calls,
                       tool_call_id=message.tool_call_id)


def _tool(n: int, tool: inference_pb2.Tool) -> Tool:
    path = f"tools[{n}].function.parameters"
    parameters = _json_object(tool.parameters_json, path) if tool.parameters_json else {}
    return Tool(tool.name, tool.description, parameters, strict=tool.strict)


def _response_format(request: inference_pb2.ChatRequest) -> ResponseFormat:
    if not request.HasField("response_format"):
        return ResponseFormat()
    sent = request.response_format
    kind = _one_of(sent.type or "text", RESPONSE_FORMATS, "response_format.type", "")
    if kind != "json_schema":
        return ResponseFormat(kind)
    if not sent.schema_json:
        raise _problem("response_format.json_schema.schema", "required for json_schema (a JSON Schema object)")
    schema = _json_object(sent.schema_json, "response_format.json_schema.schema")
    return ResponseFormat("json_schema", schema, sent.name, sent.strict, sent.description)


def _tool_choice(request: inference_pb2.ChatRequest) -> ToolChoice | None:
    if not request.HasField("tool_choice"):
        return None
    sent = request.tool_choice
    mode = _one_of(sent.mode or ("function" if sent.function_name else "auto"), TOOL_CHOICES, "tool_choice",
                   " (a named function)")
    if mode == "function" and not sent.function_name:
        raise _problem("tool_choice.function.name", "required when a function is chosen")
    return ToolChoice(mode, sent.function_name if mode == "function" else "")


def _one_of(value: str, names: tuple[Name, ...], path: str, note: str) -> Name:
    """`value` as one of `names`; `InvalidArgument` naming `path` otherwise."""
    for name in names:
        if name == value:
            return name
    raise _problem(path, f"{value!r} is not one of {', '.join(names)}{note}")


def _json_object(text: str, path: str) -> dict[str, Any]:
    """`text` parsed as a JSON object; `InvalidArgument` naming `path` otherwise."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the stack
        raise _problem(path, f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _problem(path, "must be a JSON object")
    return value


def _problem(path: str, reason: str) -> InvalidArgument:
    return InvalidArgument.from_problems([FieldProblem(path, reason)])


def chat_chunk(delta: ChatDelta, asset_id: str) -> inference_pb2.ChatChunk:
    """One streamed piece as a `ChatChunk`: its choice, text, tool-call pieces and logprobs,
    and on a choice's last piece the finish reason (and the stop sequence that ended it)."""
    chunk = inference_pb2.ChatChunk(delta=delta.text, asset_id=asset_id, index=delta.index)
    if delta.finish_reason:
        chunk.finish_reason = FINISH[delta.finish_reason]
    if delta.stop_sequence:
        chunk.stop_sequence = delta.stop_sequence
    if delta.tool_calls:
        chunk.tool_calls.extend(
            inference_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in delta.tool_calls
        )
    if delta.logprobs:
        chunk.logprobs.extend(_token_logprob(p) for p in delta.logprobs)
    if delta.usage is not None:
        chunk.usage.CopyFrom(inference_pb2.Usage(
            prompt_tokens=delta.usage.prompt_tokens,
            completion_tokens=delta.usage.completion_tokens,
            total_tokens=delta.usage.total_tokens,
        ))
    return chunk


def _token_logprob(entry: TokenLogprob) -> inference_pb2.TokenLogprob:
    return inference_pb2.TokenLogprob(
        token=entry.token, logprob=entry.logprob, bytes=entry.bytes,
        top_logprobs=[inference_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in entry.top],
    )


def token_count(count: int, asset_id: str) -> inference_pb2.TokenCount:
    """A prompt's token count as `TokenCount`."""
    return inference_pb2.TokenCount(input_tokens=count, asset_id=asset_id)


def embed_inputs(request: inference_pb2.EmbedRequest) -> list[EmbedInput]:
    """Texts and token arrays, in request order."""
    inputs: list[EmbedInput] = []
    for n, item in enumerate(request.inputs):
        kind = item.WhichOneof("kind")
        if kind == "text":
            inputs.append(item.text)
        elif kind == "tokens":
            inputs.append(list(item.tokens.ids))
        else:
            raise InvalidArgument(f"inputs[{n}]: neither text nor tokens")
    return inputs


def embed_response(result: EmbedResult, asset_id: str) -> inference_pb2.EmbedResponse:
    """Vectors as an `EmbedResponse`."""
    response = inference_pb2.EmbedResponse(
        usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        asset_id=asset_id,
        dimensions=result.dimensions,
    )
    response.MergeFromString(_embeddings_wire(result.vectors))
    return response


def _embeddings_wire(vectors: list[list[float]] | np.ndarray) -> bytes:
    """`repeated Embedding embeddings = 1` in wire format, straight from the float32 rows.

    Each row is one length-delimited `Embedding` holding one packed `values` field, so its
    bytes are the row's little-endian float32 buffer behind two short headers. Parsing that
    is a copy; building the messages value by value costs about 40 times more.
    """
    if len(vectors) == 0:
        return b""
    rows = np.ascontiguousarray(np.asarray(vectors, dtype="<f4").reshape(len(vectors), -1))
    size = rows.shape[1] * 4
    if size == 0:
        return b"\x0a\x00" * rows.shape[0]
    values_header = b"\x0a" + _varint(size)
    header = b"\x0a" + _varint(len(values_header) + size) + values_header
    return b"".join(header + row.tobytes() for row in rows)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def capabilities(caps: Capabilities) -> asset_pb2.Capabilities:
    """The model layer's capabilities as the shared message."""
    return asset_pb2.Capabilities(
        context_length=caps.context_length,
        embedding_dim=caps.embedding_dim,
        supports_system_role=caps.supports_system_role,
        supports_tools=caps.supports_tools,
        parameter_count=caps.parameter_count,
        memory_bytes=caps.memory_bytes,
        streaming=caps.streaming,
        supports_structured_output=caps.supports_structured_output,
        tool_calling=caps.tool_calling,
    )


def loaded_model(model: LoadedModelInfo) -> worker_pb2.LoadedModel:
    """A held model as `LoadedModel`."""
    return worker_pb2.LoadedModel(
        asset_id=model.asset_id,
        revision=model.revision,
        capabilities=capabilities(model.capabilities),
        memory_bytes=model.memory_bytes,
        in_flight=model.in_flight,
        max_concurrency=model.max_concurrency,
        waiting=model.waiting,
        loaded_at=timestamp(model.loaded_at),
        last_used_at=timestamp(model.last_used_at),
        load_seconds=model.load_seconds,
    )


def failed_model(model: FailedModelInfo) -> worker_pb2.FailedModel:
    """A model that failed here as `FailedModel`."""
    return worker_pb2.FailedModel(
        asset_id=model.asset_id,
        revision=model.revision,
        reason=model.reason,
        failed_at=timestamp(model.failed_at),
        stage=model.stage,
    )


def worker_info(state: WorkerState) -> worker_pb2.WorkerInfo:
    """What the worker holds and what failed here, with its memory figures."""
    return worker_pb2.WorkerInfo(
        worker_id=state.worker_id,
        address=state.address,
        memory_budget_bytes=state.memory_budget_bytes,
        memory_used_bytes=state.memory_used_bytes,
        models=[loaded_model(m) for m in state.models],
        started_at=timestamp(state.started_at),
        failed_models=[failed_model(f) for f in state.failed_models],
        seq=state.seq,
        draining=state.draining,
        has_gpu=state.gpu.present,
        gpu_memory_used_bytes=state.gpu.used_bytes,
        gpu_memory_total_bytes=state.gpu.total_bytes,
    )


def model_event(
    kind: str, asset_id: str, worker_id: str, *, reason: str = "", load_seconds: float = 0.0,
    memory_bytes: int = 0, idle_seconds: float = 0.0, evicted_for: str = "",
) -> events_pb2.Event:
    """A `model.*` event published by the worker, with its `ModelEventDetail`."""
    detail = events_pb2.ModelEventDetail(
        reason=reason, load_seconds=load_seconds, memory_bytes=memory_bytes,
        idle_seconds=idle_seconds, evicted_for=evicted_for,
    )  # fmt: skip
    return new_event(kind, "worker", asset_id=asset_id, worker_id=worker_id, model=detail)
