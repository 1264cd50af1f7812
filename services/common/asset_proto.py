"""Asset conversions: domain (`AssetSpec`, `AssetRecord`) ⇄ `roundhouse.v1` messages.

The one place that knows both shapes; servicers and clients call these and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from roundhouse.v1 import asset_pb2
from services.common.assetspec import AssetSpec, parse_spec
from services.common.errors import AssetDisabled, WrongInterface

INTERFACES = {
    "llm-runtime": asset_pb2.INTERFACE_LLM_RUNTIME,
    "embedding-runtime": asset_pb2.INTERFACE_EMBEDDING_RUNTIME,
}
RUNTIMES = {"transformers": asset_pb2.RUNTIME_TRANSFORMERS, "openai": asset_pb2.RUNTIME_OPENAI,
            "anthropic": asset_pb2.RUNTIME_ANTHROPIC}
SOURCE_KINDS = {
    "path": asset_pb2.SOURCE_KIND_PATH,
    "gguf": asset_pb2.SOURCE_KIND_GGUF,
    "pypi": asset_pb2.SOURCE_KIND_PYPI,
    "hf": asset_pb2.SOURCE_KIND_HF,
    "url": asset_pb2.SOURCE_KIND_URL,
}
DESIRED = {
    "on-demand": asset_pb2.DESIRED_STATE_ON_DEMAND,
    "running": asset_pb2.DESIRED_STATE_RUNNING,
    "disabled": asset_pb2.DESIRED_STATE_DISABLED,
}
STATES = {
    "registered": asset_pb2.ASSET_STATE_REGISTERED,
    "installing": asset_pb2.ASSET_STATE_INSTALLING,
    "installed": asset_pb2.ASSET_STATE_INSTALLED,
    "loading": asset_pb2.ASSET_STATE_LOADING,
    "loaded": asset_pb2.ASSET_STATE_LOADED,
    "sleeping": asset_pb2.ASSET_STATE_SLEEPING,
    "failed": asset_pb2.ASSET_STATE_FAILED,
}


def _reverse(mapping: dict[str, int]) -> dict[int, str]:
    return {v: k for k, v in mapping.items()}


INTERFACE_NAMES = _reverse(INTERFACES)
RUNTIME_NAMES = _reverse(RUNTIMES)
SOURCE_KIND_NAMES = _reverse(SOURCE_KINDS)
DESIRED_NAMES = _reverse(DESIRED)
STATE_NAMES = _reverse(STATES)


@dataclass
class AssetRecord:
    """A stored asset: the spec, its revision and observed state (domain side of `Asset`)."""

    spec: AssetSpec
    revision: int
    created_at: datetime
    updated_at: datetime
    state: str = "registered"
    status: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] | None = None


def check_serves(record: AssetRecord, name: str, interface: str) -> None:
    """Raise unless the asset can take requests for `interface` ('' accepts any)."""
    if interface and interface not in record.spec.interface:
        raise WrongInterface(
            f"model '{name}' implements {', '.join(record.spec.interface)}, not {interface}"
        )
    if record.spec.desired == "disabled":
        raise AssetDisabled(f"model '{name}' is disabled")


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for a datetime (None stays None)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def spec_to_proto(spec: AssetSpec) -> asset_pb2.AssetSpec:
    """Domain spec → `AssetSpec` message (defaults filled in)."""
    doc = spec.to_document()
    src = spec.source
    return asset_pb2.AssetSpec(
        asset_id=spec.asset_id,
        display_name=spec.display_name,
        version=spec.version,
        asset_class=spec.asset_class,
        interfaces=[INTERFACES[i] for i in spec.interface],
        interface_version=spec.interface_version,
        runtime=RUNTIMES[spec.runtime],
        source=asset_pb2.Source(
            kind=SOURCE_KINDS[src.kind],
            **{k: v for k, v in doc["source"].items() if k != "kind"},
        ),
        resources=asset_pb2.Resources(**_present(doc["resources"])),
        lifecycle=asset_pb2.Lifecycle(
            desired=DESIRED[spec.desired], auto_sleep_min=spec.auto_sleep_min,
            min_resident_s=spec.lifecycle.min_resident_s,
        ),
        policy=asset_pb2.Policy(**doc["policy"]),
        generation=asset_pb2.Generation(**_present(doc["generation"])),
        metadata=asset_pb2.Metadata(**_present(doc["metadata"])),
        aliases=spec.aliases,
        labels=spec.labels,
        pricing=asset_pb2.Pricing(**doc["pricing"]) if spec.pricing else None,
    )


def spec_document_from_proto(msg: asset_pb2.AssetSpec) -> dict[str, Any]:
    """`AssetSpec` message → a YAML-shaped document, for validation by `parse_spec`.

    Unset enums map to values validation rejects with a clear reason; zero numbers of
    optional fields are left out so defaults apply.
    """
    src = msg.source
    doc: dict[str, Any] = {
        "asset_id": msg.asset_id,
        "display_name": msg.display_name,
        "version": msg.version,
        "class": msg.asset_class or "model",
        "interface": [INTERFACE_NAMES.get(i, f"unspecified({i})") for i in msg.interfaces],
        "interface_version": msg.interface_version or "v1",
        "runtime": RUNTIME_NAMES.get(msg.runtime, "transformers" if not msg.runtime else "?"),
        "source": {
            "kind": SOURCE_KIND_NAMES.get(src.kind, "unspecified"),
            **{
                name: getattr(src, name)
                for name in ("path", "package", "file", "repo", "revision", "url",
                             "api_key_env", "upstream_model")
                if getattr(src, name)
            },
        },
        "aliases": list(msg.aliases),
        "labels": dict(msg.labels),
    }
    # Optional fields carry presence, so a zero the caller did set reaches validation.
    for name in ("resources", "policy", "generation", "metadata", "pricing"):
        if msg.HasField(name):
            doc[name] = json_format.MessageToDict(
                getattr(msg, name), preserving_proto_field_name=True
            )
    if msg.HasField("lifecycle"):
        lc = msg.lifecycle
        doc["lifecycle"] = {}
        if lc.desired:
            doc["lifecycle"]["desired"] = DESIRED_NAMES.get(lc.desired, f"unspecified({lc.desired})")
        if lc.HasField("auto_sleep_min"):
            doc["lifecycle"]["auto_sleep_min"] = lc.auto_sleep_min
        if lc.HasField("min_resident_s"):
            doc["lifecycle"]["min_resident_s"] = lc.min_resident_s
    return doc


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def spec_from_proto(msg: asset_pb2.AssetSpec, *, source_roots: list[Any] | None = None) -> AssetSpec:
    """`AssetSpec` message → validated domain spec (raises `InvalidSpec`)."""
    return parse_spec(spec_document_from_proto(msg), source_roots=source_roots)


def capabilities_to_proto(caps: dict[str, Any] | None) -> asset_pb2.Capabilities | None:
    """Stored capabilities (JSON dict) → message."""
    if not caps:
        return None
    return json_format.ParseDict(caps, asset_pb2.Capabilities(), ignore_unknown_fields=True)


def capabilities_from_proto(msg: asset_pb2.Capabilities) -> dict[str, Any]:
    """Capabilities message → JSON dict for storage."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def record_to_proto(record: AssetRecord) -> asset_pb2.Asset:
    """Stored asset → `Asset` message."""
    status = record.status
    asset = asset_pb2.Asset(
        spec=spec_to_proto(record.spec),
        revision=record.revision,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        status=asset_pb2.AssetStatus(
            state=STATES.get(record.state, asset_pb2.ASSET_STATE_UNSPECIFIED),
            message=status.get("message", ""),
            store_path=status.get("store_path", ""),
            worker_ids=status.get("worker_ids", []),
        ),
    )
    for key in ("updated_at", "last_used_at"):
        if status.get(key):
            getattr(asset.status, key).FromJsonString(status[key])
    caps = capabilities_to_proto(record.capabilities)
    if caps is not None:
        asset.capabilities.CopyFrom(caps)
    return asset


def record_from_proto(msg: asset_pb2.Asset) -> AssetRecord:
    """`Asset` message → domain record (for clients such as the router and the CLI)."""
    status = json_format.MessageToDict(msg.status, preserving_proto_field_name=True)
    status.pop("state", None)
    return AssetRecord(
        spec=_trusted_spec(msg.spec),
        revision=msg.revision,
        created_at=msg.created_at.ToDatetime(),
        updated_at=msg.updated_at.ToDatetime(),
        state=STATE_NAMES.get(msg.status.state, "registered"),
        status=status,
        capabilities=capabilities_from_proto(msg.capabilities) if msg.HasField("capabilities") else None,
    )


def _trusted_spec(msg: asset_pb2.AssetSpec) -> AssetSpec:
    # A stored spec was validated against the registry's source roots when applied;
    # a client does not know those roots, so it must not re-check absolute paths.
    return parse_spec(spec_document_from_proto(msg), source_roots=["/"], upstreams=None)
