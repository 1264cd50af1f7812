"""The worker's model layer: hosted models and how to load them, with no gRPC in sight.

`load_model` picks the runtime from the spec; the returned `HostedModel` streams chat
(`chat`) and/or embeds (`embed`) according to its interfaces.
"""

from __future__ import annotations

import threading
from pathlib import Path

from services.common.assetspec import AssetSpec
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.upstreams import DEFAULT_UPSTREAM_RULES, UpstreamRules
from services.worker.models.anthropic_remote import AnthropicRemoteModel
from services.worker.models.batching import BatchSettings
from services.worker.models.causal_lm import TransformersChatModel
from services.worker.models.encoder import SentenceEmbeddingModel
from services.worker.models.engine import BatchingSettings
from services.worker.models.openai_remote import OpenAIRemoteModel, UpstreamHTTPError
from services.worker.models.types import (
    EMBEDDING,
    LLM,
    Capabilities,
    ChatDelta,
    ChatMessage,
    ChatParams,
    EmbedInput,
    EmbedResult,
    HostedModel,
    Tool,
    Usage,
)

__all__ = [
    "EMBEDDING",
    "LLM",
    "AnthropicRemoteModel",
    "BatchSettings",
    "BatchingSettings",
    "Capabilities",
    "ChatDelta",
    "ChatMessage",
    "ChatParams",
    "EmbedInput",
    "EmbedResult",
    "HostedModel",
    "OpenAIRemoteModel",
    "SentenceEmbeddingModel",
    "Tool",
    "TransformersChatModel",
    "UpstreamHTTPError",
    "Usage",
    "load_model",
]

_TRANSFORMERS_LOAD = threading.Lock()
"""transformers' loading is not thread-safe: two models loaded at once in one process can
come out corrupted (seen: SmolLM2 loaded beside MiniLM answering garbage). Loads of
transformers models in a process therefore take turns; serving never waits on this."""


def load_model(
    spec: AssetSpec,
    folder: Path | None,
    *,
    chat_batching: BatchingSettings | None = None,
    embed_batching: BatchSettings | None = None,
    upstreams: UpstreamRules = DEFAULT_UPSTREAM_RULES,
) -> HostedModel:
    """Load `spec` from its installed `folder` (None for remote runtimes).

    Blocking (weights are read and capabilities measured): the caller runs it in a thread.
    Loads of transformers models in one process run one at a time (see `_TRANSFORMERS_LOAD`).
    A `transformers` asset hosts one interface: `llm-runtime` loads a causal LM,
    `embedding-runtime` a sentence-transformers model. An `openai` or `anthropic` asset is
    checked against `upstreams` (`InvalidSpec`) before its key is read.
    """
    if spec.runtime == "openai":
        return OpenAIRemoteModel(spec, upstreams=upstreams)
    if spec.runtime == "anthropic":
        return AnthropicRemoteModel(spec, upstreams=upstreams)
    if spec.runtime != "transformers":
        raise InvalidArgument(f"runtime '{spec.runtime}' is not supported by this worker")
    if folder is None or not Path(folder).is_dir():
        raise FailedPrecondition(f"model '{spec.asset_id}' is not installed (no folder {folder})")
    interfaces = set(spec.interface)
    if interfaces == {LLM}:
        with _TRANSFORMERS_LOAD:
            return TransformersChatModel.load(spec, Path(folder), chat_batching)
    if interfaces == {EMBEDDING}:
        with _TRANSFORMERS_LOAD:
            return SentenceEmbeddingModel.load(spec, Path(folder), embed_batching)
    raise InvalidArgument(
        f"model '{spec.asset_id}': the transformers runtime hosts one interface per asset; "
        f"declare either {LLM} or {EMBEDDING}"
    )
