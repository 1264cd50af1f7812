"""Worker messages ⇄ the model layer's domain types."""

from __future__ import annotations

import json
import math

import numpy as np

from roundhouse.v1 import asset_pb2, events_pb2, inference_pb2, worker_pb2
from services.common.asset_proto import timestamp
from services.common.errors import InvalidArgument
from services.common.events import new_event
from services.common.grpc_interceptors import QUEUE_TIMEOUT_KEY
from services.worker.holdings import FailedModelInfo, LoadedModelInfo, WorkerState
from services.worker.models import Capabilities, ChatDelta, ChatMessage, ChatParams, EmbedInput, EmbedResult, Tool

FINISH = {"stop": inference_pb2.FINISH_REASON_STOP, "length": inference_pb2.FINISH_REASON_LENGTH}


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
    """A `ChatRequest` as the model layer's parameters."""
    tools = []
    for tool in request.tools:
        try:
            parameters = json.loads(tool.parameters_json) if tool.parameters_json else {}
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"tools: parameters of '{tool.name}' are not JSON: {exc}") from None
        tools.append(Tool(tool.name, tool.description, parameters))
    return ChatParams(
        messages=[ChatMessage(m.role, m.content, m.name) for m in request.messages],
        prompt=request.prompt if not request.messages else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        tools=tools,
    )


def chat_chunk(delta: ChatDelta, asset_id: str) -> inference_pb2.ChatChunk:
    """One streamed piece as a `ChatChunk`."""
    chunk = inference_pb2.ChatChunk(delta=delta.text, asset_id=asset_id)
    if delta.finish_reason:
        chunk.finish_reason = FINISH[delta.finish_reason]
    if delta.usage is not None:
        chunk.usage.CopyFrom(inference_pb2.Usage(
            prompt_tokens=delta.usage.prompt_tokens,
            completion_tokens=delta.usage.completion_tokens,
            total_tokens=delta.usage.total_tokens,
        ))
    return chunk


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
