"""The Ollama-compatible API under `/api` (see `routes`)."""

from services.router.http.ollama.lifecycle import ModelLifecycle
from services.router.http.ollama.routes import ollama_router
from services.router.http.ollama.serving import OllamaServing

__all__ = ["ModelLifecycle", "OllamaServing", "ollama_router"]
