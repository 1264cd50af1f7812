"""How Roundhouse's models look through the Ollama API: `/api/tags`, `/api/ps`, `/api/show`.

A model's Ollama name is its asset id (aliases and routes are names too, resolved as
everywhere else). Its `digest` is the SHA-256 of its declared spec, so it changes exactly
when the spec does; `size` is what its files take in the model store (0 when the jobs
service cannot say, or for a remote model). In `/api/ps`, `size` is the loaded model's
measured memory, `size_vram` that same figure on a worker with a GPU (0 without), and
`expires_at` when it would be unloaded for idleness (see `lifecycle`): its last use plus its
`auto_sleep_min`, or far in the future (as Ollama shows a model kept forever) when it
never sleeps.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common.asset_proto import AssetRecord
from services.common.route_proto import RouteRecord, Stored

FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""What Ollama adds to now for a model kept forever (Go's longest duration)."""
SLEEP_UNIT_S = 60
"""Seconds in one unit of `auto_sleep_min`."""


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC, as Ollama writes times."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def now() -> str:
    """The current time, as Ollama writes it."""
    return timestamp(datetime.now(UTC))


def digest(record: Stored) -> str:
    """SHA-256 (hex) of the declared spec."""
    document = json.dumps(record.spec.to_document(), sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def context_length(record: Stored) -> int:
    """The model's context length, declared or detected; 0 when unknown (and for a route)."""
    if not isinstance(record, AssetRecord):
        return 0
    detected = record.capabilities or {}
    return int(record.spec.metadata.context_length or detected.get("context_length") or 0)


def parameter_size(count: int) -> str:
    """`135M`, `1.5B`: a parameter count as Ollama labels it; '' when unknown."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + unit
    return str(count) if count else ""


def details(record: Stored) -> dict[str, Any]:
    """Ollama's `details`: format, family, parameter size and quantization."""
    if isinstance(record, RouteRecord):
        return {"parent_model": "", "format": "route", "family": "route", "families": ["route"],
                "parameter_size": "", "quantization_level": ""}
    spec, detected = record.spec, record.capabilities or {}
    family = spec.metadata.family or ("remote" if spec.runtime != "transformers" else "")
    return {
        "parent_model": "",
        "format": "remote" if spec.source.kind == "url" else spec.source.kind if spec.source.kind == "gguf"
        else "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(int(detected.get("parameter_count") or 0)),
        "quantization_level": (spec.metadata.quantization or spec.metadata.precision).upper(),
    }


def capabilities(record: Stored) -> list[str]:
    """Ollama's capability words: `completion`, `embedding`, `tools`."""
    interfaces = record.spec.interfaces if isinstance(record, RouteRecord) else record.spec.interface
    found = []
    if "llm-runtime" in interfaces:
        found.append("completion")
        detected = record.capabilities or {} if isinstance(record, AssetRecord) else {}
        if detected.get("tool_calling") or detected.get("supports_tools"):
            found.append("tools")
    if "embedding-runtime" in interfaces:
        found.append("embedding")
    return found


def tag(record: Stored, size: int) -> dict[str, Any]:
    """One entry of `/api/tags`."""
    name = record.spec.asset_id
    return {"name": name, "model": name, "modified_at": timestamp(record.updated_at), "size": size,
            "digest": digest(record), "details": details(record)}


def expires_at(record: AssetRecord, last_used: datetime, in_flight: int) -> str:
    """When an idle model would be unloaded for idleness (see the module docstring)."""
    now_ = datetime.now(UTC)
    minutes = record.spec.auto_sleep_min
    if not minutes:
        return timestamp(now_ + FOREVER)
    since = now_ if in_flight else last_used
    return timestamp(since + timedelta(seconds=minutes * SLEEP_UNIT_S))


def running(record: AssetRecord, memory_bytes: int, on_gpu: bool, last_used: datetime,
            in_flight: int) -> dict[str, Any]:
    """One entry of `/api/ps`."""
    name = record.spec.asset_id
    entry = {"name": name, "model": name, "size": memory_bytes, "digest": digest(record),
             "details": details(record), "expires_at": expires_at(record, last_used, in_flight),
             "size_vram": memory_bytes if on_gpu else 0}
    if length := context_length(record):
        entry["context_length"] = length
    return entry


def show(record: Stored) -> dict[str, Any]:
    """`/api/show`: a Modelfile-like summary, the generation defaults as `parameters`, the
    details, `model_info` (architecture, parameter count, context and embedding lengths)
    and the capabilities."""
    info: dict[str, Any] = {}
    parameters: list[str] = []
    modelfile = [f"# Roundhouse model {record.spec.asset_id}", f"FROM {record.spec.asset_id}"]
    if isinstance(record, AssetRecord):
        spec, detected = record.spec, record.capabilities or {}
        architecture = spec.metadata.family or spec.runtime
        info["general.architecture"] = architecture
        if count := int(detected.get("parameter_count") or 0):
            info["general.parameter_count"] = count
        if length := context_length(record):
            info[f"{architecture}.context_length"] = length
        if dim := int(spec.metadata.embedding_dim or detected.get("embedding_dim") or 0):
            info[f"{architecture}.embedding_length"] = dim
        generation = spec.generation
        for name, value in (("temperature", generation.temperature), ("top_p", generation.top_p),
                            ("num_predict", generation.max_tokens)):
            if value is not None:
                parameters.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
        modelfile += [f"PARAMETER {p}" for p in parameters]
        if spec.metadata.license:
            modelfile.append(f'LICENSE "{spec.metadata.license}"')
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": "\n".join(parameters),
        "template": "",
        "license": record.spec.metadata.license if isinstance(record, AssetRecord) else "",
        "details": details(record),
        "model_info": info,
        "capabilities": capabilities(record),
        "modified_at": timestamp(record.updated_at),
    }
