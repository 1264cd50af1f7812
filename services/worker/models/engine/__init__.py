"""Our own chat engine: iteration-level scheduling of batched decode steps over the model's
forward pass, with a padded KV cache that sequences join and leave (see `ChatEngine`)."""

from services.worker.models.engine.engine import BatchingSettings, ChatEngine

__all__ = ["BatchingSettings", "ChatEngine"]
