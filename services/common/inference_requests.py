"""What every inference request must be, checked the same way at every door.

The router's gateway checks each `roundhouse.v1.ChatRequest` and `EmbedRequest` before it
resolves the model, so the OpenAI HTTP shim and the gRPC front refuse the same requests; a
worker checks again what it is sent directly (the jobs service and tests call workers). The
HTTP request models take their bounds from the constants here, so the published schema and
both checks cannot drift apart.

Problems are `FieldProblem`s whose path is the OpenAI parameter (`messages[0].role`,
`top_p`, `input[3]`): over HTTP it becomes the error's `param`, over gRPC the message
starts with it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from roundhouse.v1 import inference_pb2
from services.common.assetspec_fields import MAX_NAME_CHARS
from services.common.errors import FieldProblem, InvalidArgument
from services.common.request_schemas import schema_problems
from services.common.request_text import NUL_REASON, shown

ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128
"""Longest request id (the HTTP API accepts a client's `x-request-id` up to this long)."""
MAX_MESSAGES = 4096
"""Most messages in one conversation."""
MAX_TEXT_CHARS = 4 * 1024 * 1024
"""Longest text of one field: a message's content, a prompt, an embedding input, a tool's
description or parameters (a request as a whole is bounded by `ROUNDHOUSE_MAX_BODY_BYTES`
at both doors)."""
MAX_TOOLS = 128
"""Most tools offered in one request (OpenAI's limit)."""
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0
TOP_P_MIN, TOP_P_MAX = 0.0, 1.0
"""`top_p` 0 keeps only the most likely token: greedy decoding."""
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP_SEQUENCES = 16
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_INPUTS = 2048
"""Most inputs in one embedding request."""
MAX_INPUT_TOKENS = 1024 * 1024
"""Most token ids in one pre-tokenized embedding input."""
MAX_TOKEN_ID = 2**32 - 1
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""gRPC's default limit on a received message: a response must fit it for any client."""
RESPONSE_OVERHEAD_BYTES = 1024
"""Room for what an `EmbedResponse` carries besides the vectors (usage, asset id)."""
MAX_LISTED_PROBLEMS = 10
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0
"""Bounds of `presence_penalty` and `frequency_penalty` (OpenAI's)."""
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0
MAX_LOGIT_BIASES = 300
"""Most token ids one `logit_bias` may name (OpenAI's limit)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per position with `logprobs` (OpenAI's limit)."""
MAX_CHOICES = 16
"""Most completions (`n`) one request may ask for: each is a sequence of its own in the
engine's batch, so the bound keeps one request from taking a whole batch."""
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICE_MODES = ("auto", "none", "required", "function")

_FUNCTION_NAME = re.compile(FUNCTION_NAME)


def check_chat(request: inference_pb2.ChatRequest) -> None:
    """Raise `InvalidArgument` listing what is wrong with a chat or completion request."""
    problems = _model_problems(request.model) + _request_id_problems(request.request_id)
    if request.messages and request.prompt:
        problems.append(FieldProblem("prompt", "give either messages or prompt, not both"))
    elif not request.messages and not request.prompt:
        problems.append(FieldProblem(
            "messages", "required: a conversation, or a prompt for a plain text completion"))
    problems += _message_problems(request.messages)
    problems += _text_problems("prompt", request.prompt)
    if request.HasField("temperature") and not TEMPERATURE_MIN <= request.temperature <= TEMPERATURE_MAX:
        problems.append(FieldProblem(
            "temperature", f"must be between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g}"))
    if request.HasField("top_p") and not TOP_P_MIN <= request.top_p <= TOP_P_MAX:
        problems.append(FieldProblem(
            "top_p", f"must be between {TOP_P_MIN:g} and {TOP_P_MAX:g} (0: only the most likely token)"))
    if request.HasField("max_tokens") and not 1 <= request.max_tokens <= MAX_TOKENS_LIMIT:
        problems.append(FieldProblem("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}"))
    problems += _stop_problems(request.stop)
    problems += _tool_problems(request.tools)
    problems += _request_schema_problems(request)
    if request.tools and request.prompt and not request.messages:
        problems.append(FieldProblem("tools", "tools need messages: a raw prompt is sent to the "
                                              "model as is, with no chat template to offer them"))
    problems += _user_problems(request.user)
    problems += _generation_problems(request)
    _raise(problems)


def check_tools_supported(request: inference_pb2.ChatRequest, asset_id: str, supports_tools: bool) -> None:
    """Refuse tools a model's chat template cannot take (known once the model is loaded)."""
    if request.tools and request.messages and not supports_tools:
        _raise([FieldProblem("tools", f"model {shown(asset_id)} does not accept tools: its chat "
                                      "template has no place for them")])


def check_embed(request: inference_pb2.EmbedRequest) -> None:
    """Raise `InvalidArgument` listing what is wrong with an embedding request."""
    problems = _model_problems(request.model) + _request_id_problems(request.request_id)
    count = len(request.inputs)
    if count == 0:
        problems.append(FieldProblem("input", "at least one input is required"))
    elif count > MAX_INPUTS:
        problems.append(FieldProblem(
            "input", f"{count} inputs, but at most {MAX_INPUTS} fit in one request; "
                     "split it into several requests"))
    else:
        for n, item in enumerate(request.inputs):
            kind = item.WhichOneof("kind")
            if kind is None:
                problems.append(FieldProblem(f"input[{n}]", "neither text nor token ids"))
            elif kind == "text" and not item.text:
                problems.append(FieldProblem(f"input[{n}]", "must not be an empty string"))
            elif kind == "text":
                problems += _text_problems(f"input[{n}]", item.text)
            elif not item.tokens.ids:
                problems.append(FieldProblem(f"input[{n}]", "must not be an empty token array"))
            elif len(item.tokens.ids) > MAX_INPUT_TOKENS:
                problems.append(FieldProblem(
                    f"input[{n}]", f"{len(item.tokens.ids)} token ids; at most {MAX_INPUT_TOKENS}"))
            if len(problems) >= MAX_LISTED_PROBLEMS:
                break
    problems += _user_problems(request.user)
    _raise(problems)


def check_embed_size(count: int, dimensions: int) -> None:
    """Refuse `count` vectors of `dimensions` values whose response would not fit in one
    gRPC message (`MAX_RESPONSE_BYTES`); 0 dimensions (not known yet) passes."""
    if dimensions <= 0 or count <= max_embed_inputs(dimensions):
        return
    size_mib = embed_response_bytes(count, dimensions) / 2**20
    _raise([FieldProblem(
        "input",
        f"{count} vectors of {dimensions} dimensions make a response of {size_mib:.1f} MiB, over "
        f"the {MAX_RESPONSE_BYTES // 2**20} MiB one response may carry; split the request into "
        f"requests of at most {max_embed_inputs(dimensions)} inputs",
    )])


def embed_response_bytes(count: int, dimensions: int) -> int:
    """Encoded size of an `EmbedResponse` with `count` vectors of `dimensions` floats."""
    return count * _vector_bytes(dimensions) + RESPONSE_OVERHEAD_BYTES


def max_embed_inputs(dimensions: int) -> int:
    """Most vectors of `dimensions` floats one response can carry (at most `MAX_INPUTS`)."""
    fit = (MAX_RESPONSE_BYTES - RESPONSE_OVERHEAD_BYTES) // _vector_bytes(dimensions)
    return min(MAX_INPUTS, fit)


def subject(request: inference_pb2.ChatRequest) -> str:
    """The parameter holding a chat request's text: `messages`, or `prompt`."""
    return "messages" if request.messages else "prompt"


def locate(exc: InvalidArgument, field: str) -> InvalidArgument:
    """`exc`, naming `field` when it names none (the model layer speaks of the request as a
    whole: a prompt beyond the context, a template that refuses the conversation)."""
    if exc.field is not None:
        return exc
    return type(exc)(f"{field}: {exc.message}", [FieldProblem(field, exc.message)])


def _model_problems(model: str) -> list[FieldProblem]:
    if not model:
        return [FieldProblem("model", "required")]
    if len(model) > MAX_NAME_CHARS:
        return [FieldProblem("model", f"at most {MAX_NAME_CHARS} characters")]
    return []


def _request_id_problems(request_id: str) -> list[FieldProblem]:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return [FieldProblem("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")]
    return []


def _text_problems(path: str, text: str) -> list[FieldProblem]:
    if len(text) > MAX_TEXT_CHARS:
        return [FieldProblem(path, f"{len(text)} characters; at most {MAX_TEXT_CHARS} fit in one field")]
    return []


def _message_problems(messages: Sequence[inference_pb2.ChatMessage]) -> list[FieldProblem]:
    if len(messages) > MAX_MESSAGES:
        return [FieldProblem("messages", f"{len(messages)} messages; at most {MAX_MESSAGES} fit in "
                                         "one conversation")]
    problems = []
    for n, message in enumerate(messages):
        if message.role not in ROLES:
            problems.append(FieldProblem(
                f"messages[{n}].role",
                f"{shown(message.role)} is not a role; one of {', '.join(ROLES)}"))
        problems += _text_problems(f"messages[{n}].content", message.content)
        if len(message.name) > MAX_NAME_CHARS:
            problems.append(FieldProblem(f"messages[{n}].name", f"at most {MAX_NAME_CHARS} characters"))
        if len(problems) >= MAX_LISTED_PROBLEMS:
            break
    return problems


def _stop_problems(stop: Sequence[str]) -> list[FieldProblem]:
    if len(stop) > MAX_STOP_SEQUENCES:
        return [FieldProblem("stop", f"{len(stop)} stop sequences; at most {MAX_STOP_SEQUENCES}")]
    return [FieldProblem(f"stop[{n}]", "must not be empty") for n, s in enumerate(stop) if not s]


def _tool_problems(tools: Sequence[inference_pb2.Tool]) -> list[FieldProblem]:
    if len(tools) > MAX_TOOLS:
        return [FieldProblem("tools", f"{len(tools)} tools; at most {MAX_TOOLS}")]
    problems = []
    for n, tool in enumerate(tools):
        if not _FUNCTION_NAME.match(tool.name):
            problems.append(FieldProblem(
                f"tools[{n}].function.name",
                f"{shown(tool.name)} must be 1-64 letters, digits, '_' or '-'"))
        problems += _text_problems(f"tools[{n}].function.description", tool.description)
        if len(tool.parameters_json) > MAX_TEXT_CHARS:
            problems += _text_problems(f"tools[{n}].function.parameters", tool.parameters_json)
        elif tool.parameters_json and not _is_json_object(tool.parameters_json):
            problems.append(FieldProblem(
                f"tools[{n}].function.parameters", "must be a JSON object (a JSON Schema)"))
    return problems


def _request_schema_problems(request: inference_pb2.ChatRequest) -> list[FieldProblem]:
    """`schema_problems` of the schemas sent as JSON text (text that is not a JSON object is
    reported by the checks of its own field)."""
    response = None
    if request.HasField("response_format") and request.response_format.type == "json_schema":
        response = _json_object(request.response_format.schema_json or "{}")
    parameters = [_json_object(t.parameters_json) if 0 < len(t.parameters_json) <= MAX_TEXT_CHARS else None
                  for t in request.tools]  # by position: a problem names tools[n]
    return schema_problems(response, parameters)


def _generation_problems(request: inference_pb2.ChatRequest) -> list[FieldProblem]:
    """Penalties, biases, log probabilities, choices and the answer's shape."""
    problems = [FieldProblem(name, f"must be between {PENALTY_MIN:g} and {PENALTY_MAX:g}")
                for name in ("presence_penalty", "frequency_penalty")
                if request.HasField(name) and not PENALTY_MIN <= getattr(request, name) <= PENALTY_MAX]
    if len(request.logit_bias) > MAX_LOGIT_BIASES:
        problems.append(FieldProblem("logit_bias", f"{len(request.logit_bias)} token ids; at most "
                                                   f"{MAX_LOGIT_BIASES}"))
    problems += [FieldProblem(f"logit_bias.{token}", f"must be between {LOGIT_BIAS_MIN:g} and {LOGIT_BIAS_MAX:g}")
                 for token, bias in sorted(request.logit_bias.items())
                 if not LOGIT_BIAS_MIN <= bias <= LOGIT_BIAS_MAX][:MAX_LISTED_PROBLEMS]
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        problems.append(FieldProblem("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}"))
    elif request.top_logprobs and not request.logprobs:
        problems.append(FieldProblem("top_logprobs", "needs logprobs: true"))
    if request.n > MAX_CHOICES:
        problems.append(FieldProblem("n", f"must be between 1 and {MAX_CHOICES}"))
    problems += _format_problems(request)
    return problems


def _format_problems(request: inference_pb2.ChatRequest) -> list[FieldProblem]:
    """`response_format` and `tool_choice`, alone and together."""
    problems = []
    shape = request.response_format.type if request.HasField("response_format") else ""
    if shape and shape not in RESPONSE_FORMATS:
        problems.append(FieldProblem("response_format.type", f"{shown(shape)} is not one of "
                                                             f"{', '.join(RESPONSE_FORMATS)}"))
    elif shape == "json_schema" and not _is_json_object(request.response_format.schema_json or "{}"):
        problems.append(FieldProblem("response_format.json_schema.schema", "must be a JSON object (a JSON Schema)"))
    mode = request.tool_choice.mode if request.HasField("tool_choice") else ""
    names = {tool.name for tool in request.tools}
    if mode and mode not in TOOL_CHOICE_MODES:
        problems.append(FieldProblem("tool_choice", f"{shown(mode)} is not one of {', '.join(TOOL_CHOICE_MODES)}"))
    elif mode in ("required", "function") and not request.tools:
        problems.append(FieldProblem("tool_choice", f"'{mode}' needs tools"))
    elif mode == "function" and request.tool_choice.function_name not in names:
        problems.append(FieldProblem("tool_choice", f"function {shown(request.tool_choice.function_name)} "
                                                    "is not among the tools"))
    if request.HasField("parallel_tool_calls") and not request.tools:
        problems.append(FieldProblem("parallel_tool_calls", "only allowed with tools"))
    if shape in ("json_object", "json_schema") and request.tools and mode != "none":
        problems.append(FieldProblem("response_format", "cannot be combined with tool calls; send "
                                                        "tool_choice 'none' or leave response_format out"))
    return problems


def _user_problems(user: str) -> list[FieldProblem]:
    if len(user) > MAX_NAME_CHARS:
        return [FieldProblem("user", f"at most {MAX_NAME_CHARS} characters")]
    if "\x00" in user:
        return [FieldProblem("user", NUL_REASON)]
    return []


def _is_json_object(text: str) -> bool:
    return _json_object(text) is not None


def _json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed, when it is a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        return None
    return value if isinstance(value, dict) else None


def _vector_bytes(dimensions: int) -> int:
    # One `Embedding` on the wire: tag, length, then its packed `values`: tag, length, floats.
    values = 4 * dimensions
    inner = 1 + _varint_bytes(values) + values
    return 1 + _varint_bytes(inner) + inner


def _varint_bytes(value: int) -> int:
    return max(1, math.ceil(value.bit_length() / 7))


def _raise(problems: list[FieldProblem]) -> None:
    if problems:
        raise InvalidArgument.from_problems(problems[:MAX_LISTED_PROBLEMS])
